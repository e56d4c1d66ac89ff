"""fastsd35: fast, faithful Stable Diffusion 3 / 3.5 inference.

    from fastsd35 import Pipeline
    pipe = Pipeline.from_pretrained("models/", preset="large_turbo")
    images = pipe("a red cube on a table", seed=23)

The package is layered, lowest first, and a layer imports only those below it (tests/test_layers.py checks it):
errors, files and version; kernels (the ops); models (the networks); weights (files to tensors); tiny (the tiny
family); pipeline (presets, sampling, graphs, `Pipeline`); beside it the benchmarks and the diffusers adapter; app
(jobs, outputs, the CLI, torchrun, the server).
"""

from .errors import CheckpointError, FastSD35Error
from .models.mmditx import CONFIGS, FastMMDiTX, MMDiTX, MMDiTXConfig
from .pipeline.presets import PRESETS, Preset
from .version import __version__

# Names whose modules import transformers: loaded on first use, so `import fastsd35` (and the CLI's argument
# checks) stay fast.
_LAZY = {
    "Pipeline": "pipeline.runner",
    "load_transformer": "weights.checkpoints",
    "load_vae": "weights.vae",
    "load_text_encoders": "weights.text_encoders",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__", "CONFIGS", "CheckpointError", "FastMMDiTX", "FastSD35Error", "MMDiTX", "MMDiTXConfig", "PRESETS", "Pipeline",
    "Preset", "load_text_encoders", "load_transformer", "load_vae",
]  # fmt: skip
