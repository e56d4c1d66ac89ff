"""Output files: names, PNG metadata that reproduces an image, and writes that never leave a partial file or
replace an existing one unless asked."""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, PngImagePlugin

from .errors import FastSD35Error

METADATA_KEY = "fastsd35"  # PNG text chunk holding the JSON record of every setting
PARAMETERS_KEY = "parameters"  # A1111-style summary, read by common image viewers and UIs


def slug(prompt: str, limit: int = 48) -> str:
    """A file-name-safe, lower-case excerpt of the prompt ("a red cube!" -> "a-red-cube")."""
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return text[:limit].rstrip("-") or "untitled"


def image_name(preset: str, prompt: str, seed: int) -> str:
    return f"{preset}_{slug(prompt)}_{seed}.png"


@contextmanager
def output_folder(folder: Path):
    """Create `folder` if needed and prove a file can be written there (else a one-line FastSD35Error), before any
    model is loaded. Folders created here are removed again if the block ends with none of them holding a file."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fastsd35-", suffix=".probe"):
            pass
    except OSError as e:
        _remove_empty(created)
        raise FastSD35Error(f"cannot write to output folder {folder}: {e.strerror or e}") from None
    try:
        yield folder
    finally:
        _remove_empty(created)


def _remove_empty(folders: list[Path]):
    for path in folders:  # deepest first
        try:
            path.rmdir()
        except OSError:  # not empty (or never made): keep it, and its parents
            return


def parameters_text(record: dict) -> str:
    """The A1111-style `parameters` chunk: prompt, negative prompt, then 'Key: value' pairs."""
    pairs = {
        "Steps": record["steps"],
        "Sampler": record["sampler"],
        "CFG scale": record["cfg"],
        "Seed": record["seed"],
        "Size": f"{record['width']}x{record['height']}",
        "Model": record["preset"],
        "Shift": record["shift"],
    }
    if record.get("slg"):
        pairs["Skip layer guidance"] = f"{record['slg']['scale']} on layers {record['slg']['layers']}"
    if record.get("init_image"):
        pairs["Denoising strength"] = record["denoise"]
    lines = [record["prompt"]]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items()))
    return "\n".join(lines)


def png_bytes(image: Image.Image, record: dict) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters_text(record))
    info.add_text(METADATA_KEY, json.dumps(record, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_png(folder: Path, name: str, data: bytes, overwrite: bool = False) -> Path:
    """Write `data` as folder/name atomically (a temporary file renamed into place, so an interruption leaves no
    partial PNG). Without `overwrite`, an existing file is kept and the image goes to name-2.png, name-3.png, ..."""
    folder = Path(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fastsd35-", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        stem, suffix = os.path.splitext(name)
        for n in range(1, 10_000):
            target = folder / (name if n == 1 else f"{stem}-{n}{suffix}")
            if overwrite:
                os.replace(tmp, target)
                return target
            try:
                os.link(tmp, target)  # fails if target exists: never replaces a file, even racing another run
            except FileExistsError:
                continue
            os.unlink(tmp)
            return target
        raise FastSD35Error(f"too many files named {stem}-N{suffix} in {folder}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_record(path: Path) -> dict:
    """The settings record a fastsd35 PNG carries; a one-line error for anything else."""
    try:
        with Image.open(path) as image:
            text = image.info.get(METADATA_KEY)
    except (OSError, ValueError) as e:
        raise FastSD35Error(f"cannot read {path}: {e}") from None
    if text is None:
        raise FastSD35Error(f"{path} has no fastsd35 metadata (was it written by fastsd35 run?)")
    try:
        return json.loads(text)
    except ValueError:
        raise FastSD35Error(f"{path}: its fastsd35 metadata is not valid JSON") from None
