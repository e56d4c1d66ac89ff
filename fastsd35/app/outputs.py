"""Output files: names, PNG metadata that reproduces an image, checks made before generating, and writes that never
leave a partial file, replace an existing one unless asked, or remove anything this run did not write."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, PngImagePlugin

from ..errors import FastSD35Error
from ..files import exists, is_dir, is_file, read_user_file
from ..pipeline.inputs import MAX_PNG_FILE_BYTES

METADATA_KEY = "fastsd35"  # PNG text chunk holding the JSON record of every setting
PARAMETERS_KEY = "parameters"  # A1111-style summary, read by common image viewers and UIs


def slug(prompt: str, limit: int = 48) -> str:
    """A file-name-safe, lower-case excerpt of the prompt ("a red cube!" -> "a-red-cube")."""
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return text[:limit].rstrip("-") or "untitled"


def image_name(preset: str, prompt: str, seed: int) -> str:
    return f"{preset}_{slug(prompt)}_{seed}.png"


# Room kept free beyond the PNGs' worst-case size (raw RGB plus a filter byte per row and the metadata).
FREE_SPACE_MARGIN = 16 << 20
PNG_OVERHEAD = 64 << 10


def png_size_bound(width: int, height: int) -> int:
    """An upper bound on one PNG's size: zlib never grows raw RGB rows by more than a small fraction."""
    raw = (width * 3 + 1) * height
    return raw + raw // 100 + PNG_OVERHEAD


def check_output(folder: Path, names: list[str], overwrite: bool, nbytes: int):
    """Everything about the output that can be known before generating: the folder is (or can be made) a
    writable folder on a file system with room for `nbytes` (plus a margin), every file name fits the file
    system's limits, and with `overwrite` no target is a folder. Creates nothing that it leaves behind: folders
    are made only when the first image is written (`write_png`), so a run that fails or is interrupted before
    then leaves no trace, and a folder another run may be writing into is never removed."""
    folder = Path(folder)
    existing = folder
    while not exists(existing):  # the deepest existing ancestor: what the new folders would be made in
        if existing.parent == existing:
            break
        existing = existing.parent
    if not is_dir(existing):
        raise FastSD35Error(f"cannot write to output folder {folder}: {existing} is not a folder")
    name_max = _pathconf(existing, "PC_NAME_MAX", 255)
    path_max = _pathconf(existing, "PC_PATH_MAX", 4096)
    longest = max(names, key=len, default="x.png")
    stem, suffix = os.path.splitext(longest)
    for part in [*folder.parts[len(existing.parts):], f"{stem}-9999{suffix}"]:
        if len(os.fsencode(part)) > name_max:
            raise FastSD35Error(f"cannot write to output folder {folder}: the name {part[:40]}... is longer than "
                                f"the file system's limit of {name_max} bytes")
    if len(os.fsencode(str(folder.absolute() / f"{stem}-9999{suffix}"))) >= path_max:
        raise FastSD35Error(f"cannot write to output folder {folder}: its path is longer than the system's limit")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".fastsd35-", suffix=".probe"):
            pass
    except OSError as e:
        raise FastSD35Error(f"cannot write to output folder {folder}: {e.strerror or e}") from None
    free = shutil.disk_usage(existing).free
    if free < nbytes + FREE_SPACE_MARGIN:
        raise FastSD35Error(f"not enough free space for the images in {folder}: {free >> 20} MiB free, "
                            f"{(nbytes + FREE_SPACE_MARGIN) >> 20} MiB needed")
    if overwrite and is_dir(folder):
        for name in names:
            target = folder / name
            if exists(target) and not is_file(target):
                raise FastSD35Error(f"--overwrite cannot replace {target}: it is not a file")


@contextmanager
def output_folder(folder: Path):
    """`check_output` for a folder whose file names are not known yet; yields the folder. Nothing is made here (the
    folder is made by the first `write_png`) and nothing is removed afterwards."""
    check_output(folder, [], False, 0)
    yield Path(folder)


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError, AttributeError):
        return default


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    partial PNG), with the permissions an ordinary new file gets (0666 & ~umask). Without `overwrite`, an existing
    file is kept and the image goes to name-2.png, name-3.png, ... The folder is made if it is missing (also if it
    was removed while the images were generated). Any failure is one FastSD35Error saying where the image could
    not go; nothing of it is left on disk."""
    folder = Path(folder)
    stem, suffix = os.path.splitext(name)
    tmp, made = None, []
    try:
        fd, tmp, made = _temporary_file(folder)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        for n in range(1, 10_000):
            target = folder / (name if n == 1 else f"{stem}-{n}{suffix}")
            if overwrite:
                if is_dir(target):
                    raise IsADirectoryError(errno.EISDIR, "a folder is in the way", str(target))
                os.replace(tmp, target)
                return target
            try:
                os.link(tmp, target)  # fails if target exists: never replaces a file, even racing another run
            except FileExistsError:
                continue
            os.unlink(tmp)
            return target
        raise FastSD35Error(f"too many files named {stem}-N{suffix} in {folder}")
    except OSError as e:
        raise FastSD35Error(f"the image {name} was generated but could not be written to {folder}: "
                            f"{e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.lexists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass
            _remove_if_empty(made)


def _temporary_file(folder: Path) -> tuple[int, str, list[Path]]:
    """A new temporary file in `folder`, making the folder (and its parents) if missing. Returns the descriptor, its
    path and the folders made. Another run may remove an empty folder it made between our mkdir and mkstemp
    (`_remove_if_empty`): then the folder is made again."""
    for _ in range(5):
        made = [p for p in (folder, *folder.parents) if not exists(p)]
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fastsd35-", suffix=".partial")
            return fd, tmp, made
        except FileNotFoundError:
            continue
    raise FileNotFoundError(errno.ENOENT, "the folder keeps disappearing", str(folder))


def _remove_if_empty(folders: list[Path]):
    """Remove folders this run made, deepest first, while they are empty (rmdir refuses a folder that holds anything,
    such as another run's temporary file, and writers make a vanished folder again)."""
    for path in folders:
        try:
            path.rmdir()
        except OSError:
            return


def read_record(path: Path) -> dict:
    """The settings record a fastsd35 PNG carries; a one-line error for anything else."""
    data = read_user_file(path, "PNG", MAX_PNG_FILE_BYTES)
    try:
        with Image.open(io.BytesIO(data)) as image:
            text = image.info.get(METADATA_KEY)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise FastSD35Error(f"cannot read {path}: {e}") from None
    if text is None:
        raise FastSD35Error(f"{path} has no fastsd35 metadata (was it written by fastsd35 run?)")
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise FastSD35Error(f"{path}: its fastsd35 metadata is not valid JSON") from None
