"""The networks: MMDiT-X (written once against the ops of fastsd35.kernels), the SD3.5 ControlNet, the VAE, the
CLIP/T5 text encoders and their tokenization, and the FP8 Linear layers. They know shapes and forward passes, not
files (fastsd35.weights fills them)."""
