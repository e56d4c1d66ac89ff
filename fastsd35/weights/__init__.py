"""Files to tensors: safetensors checks, the official and diffusers layouts, FP8 files, LoRA fusion. The only layer
that reads weights from disk; it fills the networks of fastsd35.models."""
