"""FP8 checkpoints, read one tensor at a time into whatever precision the model holds.

`FP8Reader` wraps a tensor source (checkpoints.TensorSource or anything with `shapes`, `get`, `label`) and hands the
model each tensor in the form it stores it:

* a weight the model holds in FP8 (fastsd35.models.fp8.FP8Linear): float8_e4m3fn bytes with a per-output-channel
  scale `<layer>.weight_scale` (N,). An e4m3fn weight with a tensor-wide scale is passed through as it is (its scale
  repeated per channel); anything else (bf16/fp16/fp32, e5m2) is quantized per channel as it is read.
* any other tensor: dequantized (weight.float() * scale) when the file holds it in FP8, else as stored.

The formats read (the scale is what multiplies the stored FP8 values back to the real weight):

* ComfyUI's scaled FP8 ("legacy"): a `scaled_fp8` marker tensor whose dtype names the FP8 type (float32 stands for
  float8_e4m3fn) and whose 2 elements, when it has 2, mean "full precision matmul" (FP8 storage, GEMMs in the compute
  dtype); FP8 weights with a 0-d `.scale_weight`; optional `.scale_input`.
* `.weight_scale` (0-d or per output channel) and optional `.input_scale`, with an optional `_quantization_metadata`
  JSON entry in the safetensors metadata: {"format_version": ..., "layers": {"<layer>": {"format": "float8_e4m3fn"}}}.
* plain float8_e4m3fn / float8_e5m2 weights with no scale (scale 1), e.g. t5xxl_fp8_e4m3fn.safetensors.

Activation scales in the file (`.scale_input`, `.input_scale`) are checked and not used: the FP8 GEMMs quantize every
activation row with its own scale (fastsd35.models.fp8). Anything malformed is a CheckpointError naming the file, the
key and what was expected. Only one tensor (and, while a quantized weight waits for its scale, that scale) is held at a
time: no full-precision copy of the model is ever made.
"""

from __future__ import annotations

import json
import math

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from ..models.fp8 import FP8_DTYPE, quantize_rows

FP8_TYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}  # safetensors dtype -> torch dtype
FLOATS = {"F64", "F32", "F16", "BF16"}
MARKER = "scaled_fp8"
WEIGHT_SCALES = (".scale_weight", ".weight_scale")  # legacy ComfyUI, newer naming
INPUT_SCALES = (".scale_input", ".input_scale")
METADATA_KEY = "_quantization_metadata"
METADATA_FORMATS = {"float8_e4m3fn": "F8_E4M3"}


def _stem(key: str, suffixes) -> str | None:
    """The layer of a scale key (`blocks.0.qkv.scale_weight` -> `blocks.0.qkv`), None if `key` is not one."""
    for suffix in suffixes:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def _torch_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class FP8Reader:
    """A tensor source over `source` that reads its FP8 formats; see the module docstring. `hold_fp8(keys)` names the
    weights the model stores in FP8 (their `.weight_scale` keys join `shapes`); quantization runs on `device`."""

    def __init__(self, source, device="cpu"):
        self.source, self.label, self.device = source, source.label, torch.device(device)
        if self.device.type == "meta":
            self.device = torch.device("cpu")
        raw = dict(source.shapes)
        dtypes = dict(getattr(source, "dtypes", {}))  # stored dtype per key, when the source knows it
        self.marker = self._read_marker(raw)
        self.full_precision_matmul = MARKER in raw and math.prod(raw[MARKER]) == 2
        self.scales: dict[str, str] = {}  # weight key -> its scale key
        self.input_scales: dict[str, str] = {}  # input-scale key -> its weight key
        for key in raw:
            if (layer := _stem(key, WEIGHT_SCALES)) is not None:
                weight = layer + ".weight"
                if weight in self.scales:
                    self._fail(key, f"a second scale for '{weight}' (it already has '{self.scales[weight]}')")
                self.scales[weight] = key
            elif (layer := _stem(key, INPUT_SCALES)) is not None:
                self.input_scales[key] = layer + ".weight"
        self.scaled = self.marker is not None or bool(self.scales)
        special = {MARKER, *self.scales.values(), *self.input_scales}
        self.tensors = {k: tuple(v) for k, v in raw.items() if k not in special}
        self._check(raw, dtypes)
        self._check_metadata(dtypes)
        self.fp8_weights: set[str] = set()
        self._pending: dict[str, torch.Tensor] = {}  # a quantized weight's other half, until it is asked for

    # -- checks on the headers, before anything is loaded ----------------------------------------------------

    def _fail(self, key: str, problem: str):
        raise CheckpointError(f"{self.label}: '{key}': {problem}")

    def _read_marker(self, raw) -> torch.dtype | None:
        if MARKER not in raw:
            return None
        dtype = self.source.get(MARKER).dtype
        if dtype == torch.float32:  # ComfyUI's convention for the default type
            return FP8_DTYPE
        if dtype not in FP8_TYPES.values():
            self._fail(MARKER, f"the scaled-FP8 marker has dtype {_torch_name(dtype)}; expected float8_e4m3fn, "
                               "float8_e5m2 or float32 (which stands for float8_e4m3fn)")
        return dtype

    def _check(self, raw, dtypes):
        for key, stored in dtypes.items():
            if stored.startswith(("F8", "F6", "F4")) and stored not in FP8_TYPES:
                self._fail(key, f"unknown FP8 type {stored}; expected F8_E4M3 (float8_e4m3fn) or F8_E5M2 (float8_e5m2)")
        for weight, scale in self.scales.items():
            if weight not in raw:
                self._fail(scale, f"a weight scale for '{weight}', which the file does not have")
            if weight in dtypes and dtypes[weight] not in FP8_TYPES:
                self._fail(scale, f"a scale for '{weight}', which is stored in {dtypes[weight]}; expected an FP8 weight")
            if scale in dtypes and dtypes[scale] not in FLOATS:
                self._fail(scale, f"scale stored as {dtypes[scale]}; expected float32 (or another float type)")
            self._check_scale_shape(scale, raw[scale], raw[weight])
        for scale, weight in self.input_scales.items():
            if weight not in raw:
                self._fail(scale, f"an input scale for '{weight}', which the file does not have")
            if math.prod(raw[scale]) != 1 or len(raw[scale]) > 1:
                self._fail(scale, f"input scale of shape {tuple(raw[scale])}; expected a single value (shape () or (1,))")
        if self.scaled:
            for key, stored in dtypes.items():
                if stored in FP8_TYPES and key in self.tensors and key not in self.scales:
                    self._fail(key, f"FP8 weight ({stored}) without its scale in a scaled-FP8 file; expected "
                                    f"'{key.removesuffix('.weight')}{WEIGHT_SCALES[0] if self.marker else WEIGHT_SCALES[1]}'")
        if self.marker is not None:
            expected = next(k for k, v in FP8_TYPES.items() if v == self.marker)
            for key, stored in dtypes.items():
                if stored in FP8_TYPES and stored != expected and key != MARKER:
                    self._fail(key, f"stored as {stored} but the '{MARKER}' marker says {expected}")

    def _check_scale_shape(self, key, shape, weight_shape):
        shape, n = tuple(shape), weight_shape[0] if weight_shape else 1
        legacy = key.endswith(WEIGHT_SCALES[0])
        allowed = [(), (1,)] + ([] if legacy else [(n,), (n, 1)])
        if shape not in allowed:
            what = "a single value (shape ())" if legacy else f"shape (), ({n},) or ({n}, 1) (one per output channel)"
            self._fail(key, f"scale of shape {shape} for a weight of shape {tuple(weight_shape)}; expected {what}")

    def _check_metadata(self, dtypes):
        """`_quantization_metadata`: every layer it lists is float8_e4m3fn with its weight and `.weight_scale`."""
        files = getattr(self.source, "files", None)
        if not files:
            return
        stored_to_key = {stored: key for key, stored in getattr(self.source, "rename", {}).items()}
        for path in sorted(set(files.values())):
            with safe_open(str(path), framework="pt") as f:
                text = (f.metadata() or {}).get(METADATA_KEY)
            if text is None:
                continue
            try:
                layers = json.loads(text)["layers"]
                items = list(layers.items())
            except (ValueError, KeyError, TypeError, AttributeError):
                raise CheckpointError(f"{path}: '{METADATA_KEY}' in the safetensors metadata is not JSON of the form "
                                      '{"layers": {"<layer>": {"format": "float8_e4m3fn"}}}') from None
            self.scaled = True
            for layer, config in items:
                fmt = config.get("format") if isinstance(config, dict) else None
                weight = stored_to_key.get(f"{layer}.weight", f"{layer}.weight" if f"{layer}.weight" in self.tensors else None)
                if fmt not in METADATA_FORMATS:
                    raise CheckpointError(f"{path}: layer '{layer}' uses quantization format {fmt!r}; "
                                          f"fastsd35 reads {', '.join(METADATA_FORMATS)}")
                if weight is None:
                    if any(stored.startswith(layer + ".") for stored in stored_to_key):
                        raise CheckpointError(f"{path}: layer '{layer}' listed in '{METADATA_KEY}' has no '.weight'")
                    continue  # a layer of another component of the same file (other prefix)
                if weight not in self.scales:
                    self._fail(weight, f"listed as {fmt} in '{METADATA_KEY}' but has no '{layer}.weight_scale'")
                if dtypes.get(weight, METADATA_FORMATS[fmt]) != METADATA_FORMATS[fmt]:
                    self._fail(weight, f"listed as {fmt} in '{METADATA_KEY}' but stored as {dtypes[weight]}")

    # -- the source interface ------------------------------------------------------------------------------

    def hold_fp8(self, weights) -> "FP8Reader":
        """The weight keys the model stores in FP8: `get` gives them as float8_e4m3fn, with `<layer>.weight_scale`."""
        self.fp8_weights = set(weights)
        return self

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = dict(self.tensors)
        for weight in self.fp8_weights:
            if weight in shapes:
                shapes[_scale_key(weight)] = shapes[weight][:1]
        return shapes

    def get(self, key: str) -> torch.Tensor:
        if key in self._pending:
            return self._pending.pop(key)
        weight = key.removesuffix("_scale")
        if key.endswith(".weight_scale") and weight in self.fp8_weights:
            self._pending[weight], scale = self._fp8_weight(weight)
            return scale
        if key in self.fp8_weights:
            q, self._pending[_scale_key(key)] = self._fp8_weight(key)
            return q
        t = self._stored(key)
        if t.dtype in FP8_TYPES.values():
            return (t.to(self.device).float() * self._scale(key, t)).reshape(t.shape)
        return t

    def _stored(self, key: str) -> torch.Tensor:
        t = self.source.get(key)
        if t.dtype.is_floating_point and t.itemsize == 1 and t.dtype not in FP8_TYPES.values():
            self._fail(key, f"unknown FP8 type {_torch_name(t.dtype)}; expected float8_e4m3fn or float8_e5m2")
        fp8 = t.dtype in FP8_TYPES.values()
        if fp8 and self.scaled and key not in self.scales:
            self._fail(key, "FP8 weight without its scale in a scaled-FP8 file; expected "
                            f"'{key.removesuffix('.weight')}{WEIGHT_SCALES[0] if self.marker else WEIGHT_SCALES[1]}'")
        if not fp8 and key in self.scales:
            self._fail(self.scales[key], f"a scale for '{key}', which is stored in {_torch_name(t.dtype)}; "
                                         "expected an FP8 weight")
        return t

    def _scale(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """The scale of FP8 `weight`, shaped (N, 1) or () to broadcast over it; 1 when the file has none."""
        if key not in self.scales:
            return torch.ones((), device=self.device)
        name = self.scales[key]
        s = self.source.get(name).to(self.device, torch.float32)
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            self._fail(name, "scale holds negative or non-finite values; expected finite values >= 0")
        return s.reshape(()) if s.numel() == 1 else s.reshape(-1, *[1] * (weight.ndim - 1))

    def _fp8_weight(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(float8_e4m3fn weight (N, K), scale (N,) fp32) for a weight the model stores in FP8."""
        t = self._stored(key)
        n = t.shape[0]
        if t.dtype == FP8_DTYPE:
            q, s = t, self._scale(key, t).reshape(-1).expand(n).contiguous()
        else:
            full = t.to(self.device).float()
            if t.dtype in FP8_TYPES.values():
                full = full * self._scale(key, t)
            q, s = quantize_rows(full)
            s = s.reshape(n)
        return q, s

    def close(self):
        self._pending.clear()
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _scale_key(weight: str) -> str:
    return weight.removesuffix(".weight") + ".weight_scale"


__all__ = ["FP8Reader", "MARKER"]
