"""From a model to images: presets and the documented limits, sampling (schedules, samplers, guidance), CUDA graphs,
memory estimates, Hub names, ControlNet inputs, the torchrun worker model, and `Pipeline` (load -> encode -> sample
-> decode)."""
