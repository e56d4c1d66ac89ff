"""The server's parts that need no HTTP packages (they run everywhere, the GPU machine included): the queue's choice
of passes, its bounds and cancellation, the Prometheus text, and `fastsd35 serve`'s command line, refused in one
line with exit status 2 before anything is loaded or bound."""

import threading
from types import SimpleNamespace

import pytest

from fastsd35.app import cli
from fastsd35.app.serve import batching, command
from fastsd35.app.serve.batching import Batcher, Work
from fastsd35.app.serve.metrics import Metrics
from fastsd35.app.serve.schema import ApiError


def work(n=1, key="a", seed=0):
    request = SimpleNamespace(n=n, seeds=list(range(seed, seed + n)))
    return Work(request, key)


def taken(slices):
    return [(s.work.request.seeds[0], s.start, s.stop) for s in slices]


def test_a_pass_takes_the_oldest_group_up_to_max_batch_in_arrival_order():
    b = Batcher(Metrics(), max_batch=4, max_queue=64)
    a1, other, a2, a3 = work(3, "a", 0), work(1, "b", 10), work(2, "a", 20), work(5, "a", 30)
    for w in (a1, other, a2, a3):
        b.submit(w)
    assert taken(b.take()) == [(0, 0, 3), (20, 0, 1)]  # request a2 is split: one image now, one later
    assert taken(b.take()) == [(10, 0, 1)]  # the oldest waiting request is now "b": its group goes next
    assert taken(b.take()) == [(20, 1, 2), (30, 0, 3)]
    assert taken(b.take()) == [(30, 3, 5)]
    assert b.metrics.queued_images == 0 and b.pending == []


def test_unbatched_passes_are_one_image_each():
    b = Batcher(Metrics(), max_batch=1, max_queue=64)
    b.submit(work(2, "a", 0))
    b.submit(work(1, "a", 5))
    assert [taken(b.take()) for _ in range(3)] == [[(0, 0, 1)], [(0, 1, 2)], [(5, 0, 1)]]


def test_the_window_waits_for_a_full_pass_but_not_beyond():
    b = Batcher(Metrics(), max_batch=4, max_queue=64, window_s=60.0)
    first = work(1, "a", 0)
    b.submit(first)
    got = []
    taker = threading.Thread(target=lambda: got.append(b.take()))
    taker.start()
    taker.join(0.2)
    assert taker.is_alive()  # one image waiting, within the window: no pass yet
    b.submit(work(3, "a", 10))  # now a full pass is queued: taken at once, the window notwithstanding
    taker.join(30)
    assert not taker.is_alive() and taken(got[0]) == [(0, 0, 1), (10, 0, 3)]
    b.window_s = 0.0
    b.submit(work(1, "a", 20))
    assert taken(b.take()) == [(20, 0, 1)]  # past the window: a partial pass goes


def test_the_queue_bound_counts_images_and_says_when_to_retry():
    metrics = Metrics()
    b = Batcher(metrics, max_batch=1, max_queue=3)
    b.submit(work(2))
    b.submit(work(1))
    with pytest.raises(ApiError) as caught:
        b.submit(work(1))
    e = caught.value
    assert (e.status, e.code, e.headers, e.metric) == (429, "queue_full", {"Retry-After": "3"}, "queue_full")
    metrics.ran(4, 20.0)  # 5 s per image measured: three waiting images are 15 s
    with pytest.raises(ApiError) as caught:
        b.submit(work(1))
    assert caught.value.headers == {"Retry-After": "15"}
    assert "the queue is full (3 images waiting, at most 3)" in caught.value.message


def test_cancel_and_close():
    b = Batcher(Metrics(), max_batch=1, max_queue=64)
    started, waiting, gone = work(2, "a", 0), work(1, "a", 5), work(1, "a", 9)
    for w in (started, waiting, gone):
        b.submit(w)
    b.cancel(gone)
    assert gone.cancelled and gone not in b.pending and b.metrics.queued_images == 3
    assert taken(b.take()) == [(0, 0, 1)]
    b.close()  # the started request keeps its waiting image; the one not started is refused
    with pytest.raises(ApiError, match="shutting down"):
        waiting.future.result(0)
    assert taken(b.take()) == [(0, 1, 2)]
    assert b.take() is None
    with pytest.raises(ApiError, match="shutting down"):
        b.submit(work())


def test_a_settled_request_ignores_late_results():
    w = work()
    w.future.cancel()  # the HTTP side gave up on it
    w.settle([("x.png", b"")])  # no InvalidStateError from the worker thread
    assert w.future.cancelled()
    w2 = work()
    w2.settle(error=ApiError(400, "first"))
    w2.settle([("x.png", b"")])
    with pytest.raises(ApiError, match="first"):
        w2.future.result(0)


def test_the_stoppable_denoiser_stops_before_a_step():
    calls = []
    stop = threading.Event()
    model = lambda x, s, y, c, **kw: calls.append(1) or x * 0  # noqa: E731
    import torch

    d = batching.StoppableDenoiser(model, (torch.zeros(1, 2, 3), torch.zeros(1, 4)), None, 1.0, 4, stop=stop.is_set)
    d(torch.ones(1, 1), torch.tensor(0.5), 0)
    stop.set()
    with pytest.raises(batching.Cancelled):
        d(torch.ones(1, 1), torch.tensor(0.5), 1)
    assert calls == [1]


def test_metrics_text():
    m = Metrics()
    m.ran(3, 1.5)
    m.ran(8, 2.0)
    m.answered(0.3, 3)
    m.error("timeout")
    text = m.render()
    assert 'fastsd35_batch_images_bucket{le="2"} 0\nfastsd35_batch_images_bucket{le="4"} 1\n' in text
    assert 'fastsd35_batch_images_bucket{le="8"} 2\n' in text and "fastsd35_batch_images_count 2\n" in text
    assert 'fastsd35_request_seconds_bucket{le="0.25"} 0\nfastsd35_request_seconds_bucket{le="0.5"} 1\n' in text
    assert "fastsd35_images_total 11\n" in text and 'fastsd35_errors_total{kind="timeout"} 1\n' in text
    assert m.seconds_per_image() == pytest.approx(3.5 / 11)
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert all(line.split("{")[0].split(" ")[0].rsplit("_", 1)[0] in names or line.split("{")[0].split(" ")[0] in names
               for line in text.splitlines() if not line.startswith("#"))  # every sample belongs to a declared metric


# -- the command line ---------------------------------------------------------------------------------------------


def serve(capsys, *argv):
    try:
        status = cli.main(["serve", *map(str, argv)])
    except SystemExit as e:  # argparse's own refusals
        status = e.code
    return status, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--max-batch", 0], "--max-batch must be an integer from 1 to 64, got 0"),
    (["--max-batch", 65], "--max-batch must be an integer from 1 to 64, got 65"),
    (["--max-queue", 0], "--max-queue must be an integer from 1 to 1000000, got 0"),
    (["--max-body-bytes", 10], "--max-body-bytes must be an integer from 1024 to 67108864, got 10"),
    (["--request-timeout", 0], "--request-timeout must be a number of seconds > 0 and <= 604800, got 0.0"),
    (["--request-timeout", "nan"], "--request-timeout must be a number of seconds > 0"),
    (["--request-timeout", "inf"], "--request-timeout must be a number of seconds > 0"),
    (["--batch-window-ms", -1], "--batch-window-ms (in seconds) must be a number of seconds >= 0"),
    (["--port", 70000], "--port must be from 0 to 65535, got 70000"),
    (["--host", "no.such.host.invalid"], "--host 'no.such.host.invalid': "),
    (["--api-key", "short"], "--api-key must be 8 to 4096 printable ASCII characters without spaces"),
    (["--device", "cpu", "--device", "cpu"], "--device names cpu, cpu: each device once"),
    (["--device", "tpu"], "unknown --device 'tpu': use cuda, cuda:N or cpu"),
    (["--steps", 4], "unrecognized arguments: --steps 4"),
    (["--preset", "nope"], "nope"),
    (["--lora", "missing.safetensors"], "missing.safetensors"),
    (["--served-model-name", ""], "--served-model-name must be 1 to 256 characters"),
])  # fmt: skip
def test_bad_command_lines_are_one_line_and_exit_2(capsys, argv, message, monkeypatch):
    monkeypatch.setattr(command, "missing_packages", lambda: [])  # refused before the HTTP packages are needed
    status, err = serve(capsys, "--preset", "tiny", "--port", 0, *argv)
    assert status == 2 and err.count("\n") == 1 and message in err, err


def test_the_key_from_the_environment_is_checked_too(capsys, monkeypatch):
    monkeypatch.setattr(command, "missing_packages", lambda: [])
    monkeypatch.setenv("FASTSD35_API_KEY", "")
    status, err = serve(capsys, "--preset", "tiny")
    assert status == 2 and err == "fastsd35: error: FASTSD35_API_KEY must be 8 to 4096 printable ASCII characters without spaces\n"


def test_without_the_serve_extra_one_line(capsys, monkeypatch):
    monkeypatch.setattr(command, "missing_packages", lambda: ["starlette", "uvicorn"])
    status, err = serve(capsys, "--preset", "tiny")
    assert status == 2 and err == "fastsd35: error: fastsd35 serve needs starlette, uvicorn: pip install 'fastsd35[serve]'\n"


def test_a_port_in_use_is_one_line(capsys, monkeypatch):
    import socket

    from fastsd35.errors import FastSD35Error

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(FastSD35Error) as caught:
            command.listen("127.0.0.1", port)
    assert str(caught.value) == f"cannot listen on 127.0.0.1:{port}: Address already in use"
    assert "\n" not in str(caught.value)




def test_percentiles_are_nearest_rank():
    from fastsd35.app.serve.bench import _percentile

    values = [5, 1, 4, 2, 3]
    assert [_percentile(values, q) for q in (1, 20, 21, 50, 95, 100)] == [1, 1, 2, 3, 5, 5]
    assert _percentile([7.0], 95) == 7.0
