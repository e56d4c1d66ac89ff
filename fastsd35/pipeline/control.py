"""The control image of a ControlNet run: made from a photo when asked (canny edges, a blur), then turned into the
ControlNet's control latent as the reference does (SPEC.md §8.3)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from ..errors import FastSD35Error
from ..models.controlnet import CANNY, control_type_id
from ..models.vae import SDVAE, process_in


def _open(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    try:
        return Image.open(image)
    except OSError as e:  # missing, unreadable or not an image
        raise FastSD35Error(f"{image}: cannot read the control image ({e})") from None


def control_pixels(image, width: int, height: int, control_type: int | str, is_8b: bool = True) -> torch.Tensor:
    """The reference's VAE input for a control image (a PIL image or a path): resized to width x height with LANCZOS,
    then RGB (in that order, as the reference), a = pixels / 255, then a*255*0.5 + 0.5 for an 8B canny ControlNet
    (the range [0.5, 128] it was trained on) and 2a - 1 otherwise. Returns (1, 3, height, width) float32."""
    image = _open(image).resize((width, height), Image.Resampling.LANCZOS).convert("RGB")
    a = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()
    if is_8b and control_type_id(control_type) == CANNY:
        return a * 255 * 0.5 + 0.5
    return 2.0 * a - 1.0


def control_latent(vae: SDVAE, image, width: int, height: int, control_type: int | str, is_8b: bool,
                   generator: torch.Generator | None) -> torch.Tensor:
    """Control image -> the ControlNet's `cond` (1, 16, height/8, width/8), float32 on the CPU: `control_pixels`, the
    VAE posterior sampled with `generator` (a seeded CPU generator; None gives the posterior mean), then process_in.
    Computed once per run: `ControlNet.forward` broadcasts it over the batch."""
    pixels = control_pixels(image, width, height, control_type, is_8b).to(vae.device, vae.dtype)
    return process_in(vae.encode(pixels, generator).float().cpu())


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing a photo into a control image


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _conv(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """(H, W) image correlated with a 2D kernel, edges replicated."""
    kh, kw = kernel.shape
    padded = F.pad(img[None, None], (kw // 2, kw // 2, kh // 2, kh // 2), mode="replicate")
    return F.conv2d(padded, kernel[None, None])[0, 0]


# Neighbours along the gradient for its direction quantised to 0, 45, 90, 135 degrees (rows grow downwards).
_NMS_OFFSETS = ((0, 1), (1, 1), (1, 0), (1, -1))


def canny(image, low: float = 100.0, high: float = 200.0, sigma: float = 1.0) -> Image.Image:
    """Canny edges of `image` as white (255) on black, RGB. Gaussian smoothing (std `sigma` px; 0 = none), 3x3 Sobel
    gradients of the 0..255 luma, non-maximum suppression across the edge, then hysteresis: pixels with gradient
    magnitude >= `high` are edges, and so are those >= `low` connected to them. The thresholds are in the units of
    OpenCV's cv2.Canny with L2gradient=True (3x3 Sobel of 0..255 values)."""
    if not 0 <= low <= high:
        raise FastSD35Error(f"canny thresholds need 0 <= low <= high, got low={low}, high={high}")
    if sigma < 0:
        raise FastSD35Error(f"canny sigma must be >= 0, got {sigma}")
    g = torch.from_numpy(np.asarray(_open(image).convert("L"), dtype=np.float32))
    if sigma > 0:
        k = _gaussian_kernel(sigma)
        g = _conv(_conv(g, k[None]), k[:, None])
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    gx, gy = _conv(g, sobel), _conv(g, sobel.T)
    mag = torch.round(torch.hypot(gx, gy) * 16) / 16  # float noise would break the ties of symmetric edges at random

    sector = torch.remainder(torch.round(torch.rad2deg(torch.atan2(gy, gx)) / 45), 4).long()
    H, W = mag.shape
    padded = F.pad(mag, (1, 1, 1, 1))
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for s, (dy, dx) in enumerate(_NMS_OFFSETS):
        ahead = padded[1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W]
        behind = padded[1 - dy : 1 - dy + H, 1 - dx : 1 - dx + W]
        keep |= (sector == s) & (mag > behind) & (mag >= ahead)  # one strict side: a 2-px ridge keeps one pixel
    keep &= mag > 0

    weak = keep & (mag >= low)
    edges = keep & (mag >= high)
    while True:  # grow the strong edges along connected weak pixels (8-connectivity)
        grown = weak & (F.max_pool2d(edges[None].float(), 3, stride=1, padding=1)[0] > 0)
        if torch.equal(grown, edges):
            break
        edges = grown
    return Image.fromarray(edges.to(torch.uint8).numpy() * 255).convert("RGB")


def blur(image, radius: float = 5.0) -> Image.Image:
    """A Gaussian blur of `image` (PIL's GaussianBlur, std `radius` px), RGB: the blur ControlNet's input."""
    if radius < 0:
        raise FastSD35Error(f"blur radius must be >= 0, got {radius}")
    return _open(image).convert("RGB").filter(ImageFilter.GaussianBlur(radius))


_PREPROCESSORS = {"canny": (canny, ("low", "high", "sigma")), "blur": (blur, ("radius",))}


def preprocess(image, kind: str, **options) -> Image.Image:
    """A control image made from a photo: kind "canny" (options low, high, sigma; see `canny`) or "blur" (option
    radius). Depth maps are not made here. The defaults are starting points: the reference ships no preprocessing."""
    if kind == "depth":
        raise FastSD35Error(
            "the depth ControlNet needs a depth map as the control image, which fastsd35 does not compute: make one "
            "with a depth model (the model card uses DepthFM), near = dark, far = bright"
        )
    if kind not in _PREPROCESSORS:
        raise FastSD35Error(f"unknown control preprocessing {kind!r}; choose canny or blur (depth maps must be supplied)")
    make, allowed = _PREPROCESSORS[kind]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise FastSD35Error(f"{kind} preprocessing has no option {', '.join(unknown)}; its options: {', '.join(allowed)}")
    return make(image, **options)
