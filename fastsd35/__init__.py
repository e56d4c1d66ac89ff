"""fastsd35: fast, faithful Stable Diffusion 3 / 3.5 inference.

    from fastsd35 import Pipeline
    pipe = Pipeline.from_pretrained("models/", preset="large_turbo")
    images = pipe("a red cube on a table", seed=23)
"""

from .errors import CheckpointError, FastSD35Error
from .model import CONFIGS, FastMMDiTX, MMDiTX, MMDiTXConfig
from .presets import PRESETS, Preset

__version__ = "0.1.0"

# Names whose modules import transformers: loaded on first use, so `import fastsd35` (and the CLI's argument
# checks) stay fast.
_LAZY = {
    "Pipeline": "runner",
    "load_transformer": "checkpoints",
    "load_vae": "vae",
    "load_text_encoders": "conditioning",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CONFIGS", "CheckpointError", "FastMMDiTX", "FastSD35Error", "MMDiTX", "MMDiTXConfig", "PRESETS", "Pipeline",
    "Preset", "load_text_encoders", "load_transformer", "load_vae",
]  # fmt: skip
