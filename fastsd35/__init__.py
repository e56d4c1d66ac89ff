"""fastsd35: fast, faithful Stable Diffusion 3 / 3.5 inference."""

from .errors import CheckpointError, FastSD35Error
from .model import CONFIGS, FastMMDiTX, MMDiTX, MMDiTXConfig

__version__ = "0.1.0"
