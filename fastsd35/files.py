"""User files: asking whether a path exists and opening it as a regular file, without ever blocking (a FIFO or a
device) or raising on a path the file system cannot hold (a name longer than its limit)."""

from __future__ import annotations

import errno
import io
import os
import stat

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
