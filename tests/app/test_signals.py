"""SIGTERM and SIGHUP end a real `fastsd35 run` process as Ctrl-C does: one line, exit 128 + the signal's number, no
partial file and nothing the run created left behind, whether the signal comes while sampling or while the PNG is
being written."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["run", "--preset", "tiny_random", "--prompt", "a", "--width", "64", "--height", "48"]
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0", "HF_HUB_OFFLINE": "1"}


def last_line(err: bytes) -> str:
    return err.decode().replace("\r", "\n").strip().splitlines()[-1]


def test_sigterm_while_sampling(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fastsd35", *ARGS, "--steps", "1000", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), cwd=tmp_path)
    seen, deadline = b"", time.monotonic() + 120
    while b"sampling:" not in seen:  # tqdm's bar: the run is inside the sampling loop
        chunk = proc.stderr.read1(4096)
        assert chunk and time.monotonic() < deadline, seen.decode()
        seen += chunk
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM == 143
    assert last_line(seen + err) == "fastsd35: SIGTERM received: stopped, nothing partial written"
    assert not out.exists()


WRITER = """
import os, signal, sys
real = os.fsync
def fsync(fd):  # a real SIGHUP, delivered while the PNG's bytes are being written
    os.kill(os.getpid(), signal.SIGHUP)
    real(fd)
os.fsync = fsync
from fastsd35.app import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sighup_while_writing(tmp_path):
    out = tmp_path / "new" / "out"
    proc = subprocess.run([sys.executable, "-c", WRITER, *ARGS, "--steps", "1", "--out", str(out)],
                          capture_output=True, env=env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 128 + signal.SIGHUP == 129, proc.stderr.decode()
    assert last_line(proc.stderr) == "fastsd35: SIGHUP received: stopped, nothing partial written"
    assert list(tmp_path.iterdir()) == []  # no PNG, no partial file, no folder this run made


@pytest.mark.parametrize("half_made", [False, True])
def test_the_message_has_a_line_of_its_own_whatever_bar_is_open(monkeypatch, capsys, half_made):
    """A signal can land while a progress bar is being made or drawn, leaving it open on the terminal's line: the
    message closes every open bar first, so it always starts a line of its own (deterministically, not by timing).
    `half_made`: the signal landed inside tqdm's constructor after the bar drew itself (it has no last_print_t, and
    tqdm's own close() then leaves the line open)."""
    from tqdm import tqdm

    from fastsd35.app import cli

    def interrupted_while_drawing(args):
        bar = tqdm(total=1000, desc="sampling", mininterval=0)  # drawn and never closed: the traceback keeps it
        if half_made:
            del bar.last_print_t
        raise cli.Terminated(signal.SIGTERM) if bar else None

    monkeypatch.setattr(cli, "run_command", interrupted_while_drawing)
    assert cli.main(ARGS) == 143
    err = capsys.readouterr().err
    assert err.split("\n")[-2:] == ["fastsd35: SIGTERM received: stopped, nothing partial written", ""], repr(err)
    assert "sampling:" in err
