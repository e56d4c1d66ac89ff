"""`fastsd35 serve` as a process: started from the command line on a free loopback port, it loads the model, serves,
and on SIGTERM stops accepting, answers 503 to what has not started, finishes the running request and exits 0."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers.serve import get, metric, post, wait_for

ROOT = Path(__file__).resolve().parents[2]
MISSING = [name for name in ("starlette", "uvicorn") if importlib.util.find_spec(name) is None]
pytestmark = [pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (pip install -e '.[test]')"),
              pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="POSIX signals")]  # fmt: skip
KEY = "process-key-0123456789"


def env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0", "HF_HUB_OFFLINE": "1", **extra}


GATED = """
import os, sys, time
from fastsd35.pipeline import runner
real = runner.Pipeline.generate
def generate(self, *args, **kwargs):  # every pass waits until the test creates the gate file
    while not os.path.exists(os.environ["GATE"]):
        time.sleep(0.01)
    return real(self, *args, **kwargs)
runner.Pipeline.generate = generate
from fastsd35.app import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_drains_and_exits_0(tmp_path):
    gate = tmp_path / "gate"
    proc = subprocess.Popen([sys.executable, "-c", GATED, "serve", "--preset", "tiny", "--port", "0", "--log-level",
                             "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env(FASTSD35_API_KEY=KEY, GATE=str(gate)), cwd=tmp_path)  # fmt: skip
    try:
        line = proc.stdout.readline().decode()
        assert line.startswith("fastsd35: serving tiny on http://127.0.0.1:"), line + proc.stderr.read().decode()
        url = line.split(" on ")[1].split()[0]
        auth = {"Authorization": f"Bearer {KEY}"}
        assert proc.stdout.readline().decode().startswith("fastsd35: ready (load ")
        assert json.loads(get(url, "/health")[2]) == {"status": "ready"}
        assert get(url, "/v1/models")[0] == 401  # the key from the environment
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(post, url, {"prompt": "a", "steps": 1, "size": "32x32", "n": 2}, auth)
            wait_for(lambda: metric(url, "fastsd35_running_images", auth) == 1, "the first request running")
            queued = pool.submit(post, url, {"prompt": "b", "steps": 1, "size": "32x32"}, auth)
            wait_for(lambda: metric(url, "fastsd35_queue_images", auth) == 2, "the second request queued")
            proc.send_signal(signal.SIGTERM)
            status, _, body = queued.result()  # not started: refused at once
            assert status == 503 and json.loads(body)["error"]["code"] == "shutting_down"
            gate.touch()
            status, _, body = running.result()  # started: both its images are made
            assert status == 200 and len(json.loads(body)["data"]) == 2
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        assert err.decode().strip().splitlines()[-1] == "fastsd35: stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_a_bad_model_is_one_line_and_exit_2(tmp_path):
    """A model that fails to load after the socket is open: one line, exit 2 (nothing served)."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "sd3.5_large_turbo.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    proc = subprocess.run([sys.executable, "-m", "fastsd35", "serve", "--preset", "large_turbo", "--model",
                           str(folder), "--port", "0", "--device", "cpu"], capture_output=True, env=env(),
                          cwd=tmp_path, timeout=120)  # fmt: skip
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 2, proc.stderr.decode()
    assert err[-1].startswith("fastsd35: error: ") and str(folder) in err[-1], err

