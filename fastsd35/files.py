"""User files: asking whether a path exists and opening it as a regular file, without ever blocking (a FIFO or a
device) or raising on a path the file system cannot hold (a name longer than its limit)."""

from __future__ import annotations

import errno
import io
import os
import stat
import tempfile
from pathlib import Path

from .errors import FastSD35Error


def _stat(path) -> os.stat_result | None:
    """os.stat(path), or None where there is nothing to stat: missing, a name longer than the file system allows,
    a component that is not a folder, a loop, no permission to look (os.path.exists's rule, for every call site)."""
    try:
        return os.stat(path)
    except (OSError, ValueError):  # ValueError: an embedded NUL byte
        return None


def exists(path) -> bool:
    """Whether `path` names something (following links). Never raises, unlike Path.exists on Python < 3.12 for a
    name longer than the file system's limit: every user path is asked through here."""
    return _stat(path) is not None


def is_file(path) -> bool:
    """Whether `path` is a regular file (following links); False for anything else, and never raises."""
    st = _stat(path)
    return st is not None and stat.S_ISREG(st.st_mode)


def is_dir(path) -> bool:
    """Whether `path` is a folder (following links); False for anything else, and never raises."""
    st = _stat(path)
    return st is not None and stat.S_ISDIR(st.st_mode)


def read_user_file(path, what: str, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Opened without blocking (a FIFO or device never hangs
    the run) and checked to be a regular file before anything is read."""
    data = io.BytesIO()
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise FastSD35Error(f"{what} {path} is {size} bytes; the limit is {limit}")
        data.write(f.read(limit + 1))
    if data.tell() > limit:  # grew while being read
        raise FastSD35Error(f"{what} {path} is more than {limit} bytes")
    return data.getvalue()


def open_regular(path, what: str, error: type[FastSD35Error] = FastSD35Error):
    """A binary file object for `path`, which must be a regular file (`error` otherwise, without blocking)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except ValueError:  # an embedded NUL byte
        raise error(f"cannot read {what} {path!r}: a path cannot hold a NUL byte") from None
    except OSError as e:
        reason = "not found" if e.errno == errno.ENOENT else e.strerror or str(e)
        raise error(f"cannot read {what} {path}: {reason}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
            raise error(f"cannot read {what} {path}: it is {kind}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_writable(path, what: str, *, folder: bool = False) -> None:
    """That `path` can be written, checked before any work is done, so that a long run does not fail at its end.
    A file: a regular file that can be opened for writing, or a new name in an existing folder that takes files. A
    folder (`folder=True`): a folder that takes files, or a path whose deepest existing part is one (the missing
    folders are made when the first file is written). Creates nothing: a probe file is made and removed at once.
    Raises FastSD35Error "<what> <path>: <why>" otherwise."""
    path = Path(path)

    def fail(why: str):
        raise FastSD35Error(f"{what} {str(path)!r}: {why}" if "\0" in str(path) else f"{what} {path}: {why}")

    def status(p: Path):
        try:
            return os.stat(p)
        except ValueError:  # an embedded NUL byte
            fail("a path cannot hold a NUL byte")
        except OSError as e:
            if e.errno == errno.ENOENT and os.path.lexists(p):  # writing would follow it, or fail on it
                fail(f"{p} is a link to nothing")
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):  # too long: the name check says so
                return None
            fail(f"cannot use it ({e.strerror or e})")

    def probe(where: Path):
        try:
            with tempfile.NamedTemporaryFile(dir=where, prefix=".fastsd35-", suffix=".probe"):
                pass
        except OSError as e:
            fail(f"cannot write in {where} ({e.strerror or e})")

    def kind(mode: int) -> str:
        kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a file"), (stat.S_ISFIFO, "a FIFO"))
        return next((name for test, name in kinds if test(mode)), "a device or socket")

    if len(os.fsencode(str(path.absolute()))) >= _PATH_MAX:
        fail("the path is longer than the system's limit")
    found = status(path)
    if found is not None and folder:
        if not stat.S_ISDIR(found.st_mode):
            fail(f"is {kind(found.st_mode)}, not a folder")
        return probe(path)
    if found is not None:
        if not stat.S_ISREG(found.st_mode):
            fail(f"is {kind(found.st_mode)}, not a file")
        if not os.access(path, os.W_OK):
            fail("the file cannot be written (permission denied)")
        return None
    existing = path.parent
    while folder and status(existing) is None and existing.parent != existing:
        existing = existing.parent
    parent = status(existing)
    if parent is None:
        fail(f"the folder {existing} does not exist")
    if not stat.S_ISDIR(parent.st_mode):
        fail(f"{existing} is {kind(parent.st_mode)}, not a folder")
    name_max = _name_max(existing)
    for part in path.parts[len(existing.parts):]:
        if len(os.fsencode(part)) > name_max:
            fail(f"the name {part[:40]}... is longer than the file system's limit of {name_max} bytes")
    probe(existing)


_PATH_MAX = 4096  # Linux's; a longer path cannot be opened even when every name in it is short


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255
