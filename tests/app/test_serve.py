"""The server over real HTTP: `fastsd35.serve.app` on the trained tiny model, served by uvicorn on a loopback port,
spoken to with the official `openai` client and with plain sockets. Where the order of events matters (a request
running while others queue, a client leaving while its request waits) a gate holds the worker inside its pass until
the test opens it, so no test depends on timing."""

import base64
import importlib.util
import io
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.serve import error_of, get, metric, post, raw, wait_for

MISSING = [name for name in ("starlette", "uvicorn", "openai") if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (pip install -e '.[test]')")

FAST = dict(size="32x32", steps=1)  # the fastest the tiny model draws: a pass takes a fraction of a second
KEY = "test-key-0123456789"


@pytest.fixture(scope="module", autouse=True)
def cpu_user():
    """The reference ops, as a user's CPU runs them (Triton's interpreter would take minutes), no network."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def pipe():
    from fastsd35 import Pipeline

    return Pipeline.from_preset("tiny")


class Gated:
    """The pipeline, with a gate: a pass waits at the gate until the test opens it; `entered` is set once a pass
    has reached it; `poison` prompts raise CUDA's out-of-memory error (as a real one would reach the server)."""

    def __init__(self, pipe, closed=True):
        self.pipe, self.gate, self.entered = pipe, threading.Event(), threading.Event()
        self.poison, self.passes = set(), []
        if not closed:
            self.gate.set()

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def generate(self, prompts, **kwargs):
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        self.passes.append(list(kwargs["seeds"]))
        if self.poison & set(prompts):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.pipe.generate(prompts, **kwargs)


def serving(pipe, **options):
    from fastsd35.app.serve.command import background
    from fastsd35.serve import app

    return background(app(pipe, **options))


def client(url, key="unused"):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def solo(pipe, prompt, seed, negative="", steps=1, size=32):
    """The image `fastsd35 run` makes for one seed (batch 1), straight from the pipeline."""
    return pixels(pipe.generate(prompt, negative, seed=seed, steps=steps, width=size, height=size, progress=False).images[0])


# -- generations --------------------------------------------------------------------------------------------------


def test_openai_client_generates_records_and_seeds(pipe, tmp_path, capsys):
    from fastsd35.app import cli
    from fastsd35.app.outputs import METADATA_KEY

    with serving(pipe) as url:
        api = client(url)
        assert [m.id for m in api.models.list().data] == ["tiny"]
        result = api.images.generate(model="tiny", prompt="a red circle on a blue background", n=3, response_format="b64_json",
                                     extra_body={"seed": 40, "negative_prompt": "green", **FAST})  # fmt: skip
    assert len(result.data) == 3 and result.size == "32x32"
    images = [decode(d.b64_json) for d in result.data]
    records = [json.loads(im.info[METADATA_KEY]) for im in images]
    assert [r["seed"] for r in records] == [d.model_extra["seed"] for d in result.data] == [40, 41, 42]
    assert {(r["prompt"], r["negative_prompt"], r["steps"], r["width"], r["preset"]) for r in records} == {
        ("a red circle on a blue background", "green", 1, 32, "tiny")}
    # Every image, n > 1 included, is the one `fastsd35 run` makes for its seed alone, bit for bit ...
    for image, seed in zip(images, (40, 41, 42)):
        np.testing.assert_array_equal(pixels(image), solo(pipe, "a red circle on a blue background", seed, "green"))
    # ... and its record makes `fastsd35 run --from-png` reproduce it.
    served = tmp_path / "served.png"
    served.write_bytes(base64.b64decode(result.data[2].b64_json))
    assert cli.main(["run", "--from-png", str(served), "--out", str(tmp_path / "out")]) == 0
    (again,) = (tmp_path / "out").iterdir()
    assert again.name == "tiny_a-red-circle-on-a-blue-background_42.png"
    np.testing.assert_array_equal(pixels(Image.open(again)), pixels(images[2]))
    capsys.readouterr()


def test_a_request_without_seed_gets_a_random_one_it_is_told(pipe):
    """... and the records name the model as the server was told it (here the tiny model's folder)."""
    from fastsd35.app.outputs import METADATA_KEY
    from fastsd35.tiny.family import trained_model_dir

    folder = str(trained_model_dir())
    with serving(pipe, model=folder) as url:
        a, b = (client(url).images.generate(prompt="a square", extra_body=FAST).data[0] for _ in range(2))
    assert a.model_extra["seed"] != b.model_extra["seed"]  # 2^31 seeds: equal by chance once in two billion runs
    record = json.loads(decode(a.b64_json).info[METADATA_KEY])
    assert record["seed"] == a.model_extra["seed"] and record["model"] == folder


def load(pipe, bodies, max_batch):
    """Every body sent at once while the worker holds the first at the gate (so the rest queue up), then the gate
    opens: (the answers in order, the images made, the passes' seeds)."""
    gated = Gated(pipe)
    with serving(gated, max_batch=max_batch, max_queue=64) as url:
        first = ThreadPoolExecutor(1).submit(post, url, bodies[0])
        assert gated.entered.wait(60)
        with ThreadPoolExecutor(len(bodies) - 1) as pool:
            rest = [pool.submit(post, url, b) for b in bodies[1:]]
            wait_for(lambda: metric(url, "fastsd35_queue_requests") == len(rest), "every request queued")
            gated.gate.set()
            answers = [first.result()] + [f.result() for f in rest]
        images = metric(url, "fastsd35_images_total")
    assert [status for status, _, _ in answers] == [200] * len(bodies)
    return [json.loads(body)["data"] for _, _, body in answers], images, gated.passes


PROMPTS = ["a red circle on a blue background", "a white triangle on a green background"]


def test_load_64_concurrent_requests_batched(pipe):
    """64 concurrent requests with --max-batch 8: all answered, none lost, the queued ones sharing passes of 8, each
    image keeping its seed: equal to the same request served alone up to the float rounding of a larger batch (at
    most one level per channel: README "Serve")."""
    bodies = [{"prompt": PROMPTS[i % 2], "seed": 100 + i, **FAST} for i in range(64)]
    data, images, passes = load(pipe, bodies, 8)
    assert [d[0]["seed"] for d in data] == [100 + i for i in range(64)] and images == 64
    assert sorted(len(p) for p in passes) == [1, 7] + [8] * 7 and sorted(sum(passes, [])) == list(range(100, 164))
    for i in (0, 21, 42, 63):
        got, want = pixels(decode(data[i][0]["b64_json"])), solo(pipe, PROMPTS[i % 2], 100 + i)
        assert np.abs(got - want).max() <= 1, i


def test_concurrent_requests_unbatched_equal_solo_bit_for_bit(pipe):
    """With --max-batch 1 (the default) every image is its own pass: bit for bit the image served alone, whatever
    else is queued."""
    bodies = [{"prompt": PROMPTS[i % 2], "seed": 7 * i, "n": 1 + i % 2, **FAST} for i in range(4)]
    data, images, passes = load(pipe, bodies, 1)
    assert images == 6 and sorted(passes) == [[0], [7], [8], [14], [21], [22]]  # in arrival order
    for i, d in enumerate(data):
        for j, image in enumerate(d):
            np.testing.assert_array_equal(pixels(decode(image["b64_json"])), solo(pipe, PROMPTS[i % 2], 7 * i + j))


@pytest.mark.filterwarnings("ignore:CLIP reads 75 tokens")
def test_prompts_of_another_t5_length_never_share_a_pass(pipe):
    """A prompt padded to another T5 length would be conditioned differently: such requests queue apart."""
    long = " ".join(["red"] * 90)  # 91 T5 tokens with the end token: padded to 91, not 77
    bodies = [{"prompt": p, "seed": s, **FAST} for p, s in (("a", 1), ("b", 2), (long, 3), ("c", 4), (long, 5))]
    data, images, passes = load(pipe, bodies, 4)
    assert images == 5 and sorted(map(sorted, passes)) == [[1], [2, 4], [3, 5]]


def test_an_out_of_memory_request_fails_alone(pipe):
    gated = Gated(pipe)
    gated.poison.add("too big")
    with serving(gated, max_batch=4) as url:
        first = ThreadPoolExecutor(1).submit(post, url, {"prompt": "a", "seed": 1, **FAST})
        assert gated.entered.wait(60)
        with ThreadPoolExecutor(2) as pool:
            bad = pool.submit(post, url, {"prompt": "too big", "seed": 2, **FAST})
            good = pool.submit(post, url, {"prompt": "a green square", "seed": 3, **FAST})
            wait_for(lambda: metric(url, "fastsd35_queue_requests") == 2, "two requests queued")
            gated.gate.set()  # the next pass holds both; it fails, each runs alone, only the poisoned one fails
            status, message = error_of(bad.result())
            assert good.result()[0] == 200 and first.result()[0] == 200
        assert status == 400 and "out of GPU memory" in message and "lower n or size" in message
        assert post(url, {"prompt": "after", "seed": 4, **FAST})[0] == 200  # and the server keeps serving
        assert metric(url, 'fastsd35_errors_total{kind="out_of_memory"}') == 1
    assert sorted(map(sorted, gated.passes)) == [[1], [2], [2, 3], [3], [4]]


# -- bad input ----------------------------------------------------------------------------------------------------


BAD_BODIES = [
    (b"{", "the request body is not valid JSON"),
    (b"\xff\xfe", "the request body is not UTF-8"),
    (b"[1, 2]", "the request body must be a JSON object, got list"),
    (b'{"prompt": "a", "steps": NaN}', "NaN is not JSON"),
    (b'{"prompt": "a", "prompt": "b"}', "the field 'prompt' is given twice"),
    (b'{"prompt": "a", "seed": 1' + b"0" * 5000 + b"}", "the request body is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deep"),
    (b'{"prompt": "\\ud800"}', "prompt is not valid Unicode"),
    ({}, "prompt is required"),
    ({"prompt": None}, "prompt must be a string, got null"),
    ({"prompt": ["a", "b"]}, "prompt must be a string, got array"),
    ({"prompt": 5}, "prompt must be a string, got integer"),
    ({"prompt": "a" * 20_001}, "a prompt of 20001 characters; the limit is 20000"),
    ({"prompt": "a", "n": 0}, "n must be an integer in [1, 64], got 0"),
    ({"prompt": "a", "n": -1}, "n must be an integer in [1, 64], got -1"),
    ({"prompt": "a", "n": 1000}, "n must be an integer in [1, 64], got 1000"),
    ({"prompt": "a", "n": 10**30}, "n must be an integer in [1, 64]"),
    ({"prompt": "a", "n": 2.0}, "n must be an integer in [1, 64], got 2.0"),
    ({"prompt": "a", "n": "2"}, "n must be an integer in [1, 64], got '2'"),
    ({"prompt": "a", "n": True}, "n must be an integer in [1, 64], got True"),
    ({"prompt": "a", "n": 40}, "n 40 is more images than this server queues (--max-queue 32)"),
    ({"prompt": "a", "size": "100x64"}, "width 100 is not a multiple of 16: use 96 or 112"),
    ({"prompt": "a", "size": "0x0"}, "width 0 is not a multiple of 16: use 16"),
    ({"prompt": "a", "size": "4096x4096"}, "width 4096 is beyond this model's position-embedding limit of 128"),
    ({"prompt": "a", "size": "64"}, 'size must be "WIDTHxHEIGHT"'),
    ({"prompt": "a", "size": "-64x64"}, 'size must be "WIDTHxHEIGHT"'),
    ({"prompt": "a", "size": "1e3x64"}, 'size must be "WIDTHxHEIGHT"'),
    ({"prompt": "a", "size": 64}, "size must be a string, got integer"),
    ({"prompt": "a", "steps": 0}, "steps must be an integer in [1, 1000], got 0"),
    ({"prompt": "a", "steps": 100_000}, "steps must be an integer in [1, 1000], got 100000"),
    ({"prompt": "a", "cfg": -1}, "cfg must be a finite number >= 0, got -1"),
    ({"prompt": "a", "cfg": 1e999}, "Infinity is not JSON"),  # what json.dumps writes for inf
    (b'{"prompt": "a", "cfg": 1e999}', "cfg must be a finite number >= 0, got inf"),  # JSON's number, read as inf
    ({"prompt": "a", "cfg": "5"}, "cfg must be a finite number >= 0, got '5'"),
    ({"prompt": "a", "shift": 0}, "shift must be a finite number > 0, got 0"),
    ({"prompt": "a", "seed": -1}, "seed must be an integer in [0, 9223372036854775807], got -1"),
    ({"prompt": "a", "seed": 2**63}, "seed must be an integer in [0, 9223372036854775807]"),
    ({"prompt": "a", "seed": 2**63 - 1, "n": 2}, "is beyond the largest seed"),
    ({"prompt": "a", "sampler": "ddim"}, "sampler must be one of euler, dpmpp_2m, got 'ddim'"),
    ({"prompt": "a", "slg": "yes"}, "slg must be true or false, got string"),
    ({"prompt": "a", "negative_prompt": 3}, "negative_prompt must be a string, got integer"),
    ({"prompt": "a", "response_format": "url"}, 'response_format must be "b64_json"'),
    ({"prompt": "a", "model": "dall-e-3"}, "model 'dall-e-3' is not served here: this server serves 'tiny'"),
    ({"prompt": "a", "user": "u" * 257}, "user is 257 characters; the limit is 256"),
    ({"prompt": "a", "quality": "hd"}, "unknown field 'quality': a request may set prompt, n, size"),
    ({"prompt": "a", "stpes": 4}, "unknown field 'stpes'"),
    ({"prompt": "a", "lora": ["/etc/passwd"]}, "lora cannot be set in a request: LoRAs are fused when the server starts"),
    ({"prompt": "a", "init_image": "/etc/passwd"}, "init_image cannot be set in a request: a server reads no file"),
    ({"prompt": "a", "prompts_file": "/etc/passwd"}, "prompts_file cannot be set in a request: a server reads no file"),
    ({"prompt": "a", "out": "/tmp"}, "out cannot be set in a request: a server writes no file"),
    ({"prompt": "a", "controlnet": "x"}, "controlnet cannot be set in a request: it is fixed when the server starts"),
    ({"prompt": "a", "dtype": "fp8"}, "dtype cannot be set in a request: the precision is fixed when the server starts"),
    ({"prompt": "a", "device": "cuda"}, "device cannot be set in a request: it is fixed when the server starts"),
    ({"prompt": "a", "preset": "large"}, "preset cannot be set in a request: it is fixed when the server starts"),
    ({"prompt": "a", "batch_size": 2}, "batch_size cannot be set in a request: use n"),
    ({"prompt": "a", "width": 64}, "width cannot be set in a request: use size"),
    ({"prompt": "a " * 400}, "T5 tokens"),
    ({"prompt": "a", "n": "x" * 100_000}, "n must be an integer in [1, 64], got 'xxxxx"),  # cut to 1000 characters
    ({"prompt": "a", "model": "m" * 100_000}, "model 'mmmm"),
    ({"prompt": "a", **{f"field{i}": 1 for i in range(50)}}, "unknown fields 'field0', 'field1', 'field10', 'field11', 'field12' and 45 more"),  # within the character limit, beyond --t5-tokens: refused before queueing
]


def test_every_bad_input_is_a_400_with_one_line(pipe):
    gated = Gated(pipe)  # a bad request never reaches a pass: the gate stays shut
    with serving(gated, max_queue=32) as url:
        for body, message in BAD_BODIES:
            status, headers, data = post(url, body)
            error = json.loads(data)["error"]
            assert status == 400 and headers["content-type"] == "application/json", (body, data)
            assert message in error["message"] and "\n" not in error["message"], (message, error)
            assert len(error["message"]) <= 1000
            assert error["type"] == "invalid_request_error"
        assert metric(url, 'fastsd35_errors_total{kind="bad_request"}') == len(BAD_BODIES)
    assert not gated.entered.is_set()


def test_the_openai_client_gets_its_own_errors(pipe):
    import openai

    with serving(pipe) as url:
        with pytest.raises(openai.BadRequestError) as caught:
            client(url).images.generate(prompt="a", n=2, extra_body={"steps": 0})
        assert caught.value.status_code == 400
        assert caught.value.body["message"] == "steps must be an integer in [1, 1000], got 0"
        with pytest.raises(openai.NotFoundError):
            client(url).models.retrieve("dall-e-3")
        assert client(url).models.retrieve("tiny").id == "tiny"


def test_body_size_limit(pipe):
    with serving(pipe, max_body_bytes=4096) as url:
        big = json.dumps({"prompt": "a" * 5000}).encode()
        assert error_of(post(url, big))[0] == 413
        announced = b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n{"
        assert error_of(raw(url, announced, timeout=30))[0] == 413  # from Content-Length, without waiting for the body
        head = b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        chunks = b"".join(b"%x\r\n%s\r\n" % (1000, b"a" * 1000) for _ in range(5)) + b"0\r\n\r\n"
        status, message = error_of(raw(url, head + chunks))  # streamed without a length: refused once past it
        assert status == 413 and message == "the request body is larger than this server's limit of 4096 bytes"
        assert post(url, {"prompt": "a" + " " * 3000 + "b", **FAST})[0] == 200  # 3 KB, two words
        assert metric(url, 'fastsd35_errors_total{kind="body_too_large"}') == 3


def test_endpoints_methods_health_and_metrics(pipe):
    with serving(pipe) as url:
        assert json.loads(get(url, "/health")[2]) == {"status": "ready"}
        assert error_of(get(url, "/v1/nothing")) == (404, "no such endpoint: /v1/nothing")
        assert error_of(get(url, "/v1/images/generations"))[0] == 405
        status, headers, body = get(url, "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        text = body.decode()
        for name in ("fastsd35_queue_images 0", "fastsd35_batch_images_bucket", "fastsd35_request_seconds_bucket",
                     'fastsd35_errors_total{kind="queue_full"} 0', "fastsd35_ready 1"):
            assert name in text


# -- auth ---------------------------------------------------------------------------------------------------------


def test_api_key_on_every_endpoint_but_health(pipe):
    import openai

    with serving(pipe, api_key=KEY) as url:
        assert get(url, "/health")[0] == 200
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456"}, {"Authorization": KEY},
                        {"Authorization": f"bearer {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
            for path in ("/v1/models", "/metrics", "/v1/nothing"):
                status, response_headers, body = get(url, path, headers)
                assert status == 401 and response_headers["www-authenticate"] == "Bearer", (path, headers)
            assert post(url, {"prompt": "a", **FAST}, headers)[0] == 401
        two = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nAuthorization: Bearer x\r\n" \
              b"Connection: close\r\n\r\n" % KEY.encode()
        assert raw(url, two)[0] == 401  # two keys: refused whichever one is right
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong-key-0123456").models.list()
        assert client(url, KEY).images.generate(prompt="a", extra_body=FAST).data[0].b64_json
        assert metric(url, "fastsd35_images_total", {"Authorization": f"Bearer {KEY}"}) == 1


def test_api_key_must_be_usable():
    from fastsd35.app.serve import check_api_key
    from fastsd35.errors import FastSD35Error

    for bad in ("short", "has space in it", "ключ-ключ-ключ", "x" * 4097, 12345678):
        with pytest.raises(FastSD35Error, match="8 to 4096 printable ASCII characters"):
            check_api_key(bad, "--api-key")


# -- queue, timeouts, clients that leave --------------------------------------------------------------------------


def test_a_full_queue_is_429_with_retry_after(pipe):
    import openai

    gated = Gated(pipe)
    with serving(gated, max_queue=3) as url:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(post, url, {"prompt": "a", "n": 3, **FAST})
            assert gated.entered.wait(60)  # its first image is running, two wait
            queued = pool.submit(post, url, {"prompt": "b", **FAST})
            wait_for(lambda: metric(url, "fastsd35_queue_images") == 3, "three images queued")
            status, headers, body = post(url, {"prompt": "c", **FAST})
            assert status == 429 and int(headers["retry-after"]) >= 1
            assert json.loads(body)["error"]["message"].startswith("the queue is full (3 images waiting, at most 3)")
            with pytest.raises(openai.RateLimitError):
                client(url).images.generate(prompt="d", extra_body=FAST)
            gated.gate.set()
            assert running.result()[0] == queued.result()[0] == 200
        assert post(url, {"prompt": "e", **FAST})[0] == 200  # room again
        assert metric(url, 'fastsd35_errors_total{kind="queue_full"}') == 2


def test_a_client_that_disconnects_cancels_its_queued_work(pipe):
    gated = Gated(pipe)
    with serving(gated) as url:
        running = ThreadPoolExecutor(1).submit(post, url, {"prompt": "a", "seed": 1, **FAST})
        assert gated.entered.wait(60)
        host, port = url.removeprefix("http://").rsplit(":", 1)
        body = json.dumps({"prompt": "b", "seed": 2, "n": 2, **FAST}).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_for(lambda: metric(url, "fastsd35_queue_images") == 2, "the request queued")
        wait_for(lambda: metric(url, 'fastsd35_errors_total{kind="disconnected"}') == 1, "the disconnect seen")
        assert metric(url, "fastsd35_queue_images") == 0  # its images left the queue
        gated.gate.set()
        assert running.result()[0] == 200
        assert post(url, {"prompt": "c", "seed": 3, **FAST})[0] == 200
    assert gated.passes == [[1], [3]]  # seed 2's images were never made


def test_a_request_past_its_time_is_504_and_its_pass_stops(pipe):
    gated = Gated(pipe)
    with serving(gated, request_timeout_s=0.5) as url:
        status, message = error_of(post(url, {"prompt": "a", **FAST}))
        assert status == 504 and message.startswith("the request took longer than this server's limit of 0.5 s")
        gated.gate.set()  # the pass then finds its only request gone and stops before its first step
        wait_for(lambda: metric(url, "fastsd35_running_images") == 0, "the pass stopped")
        assert metric(url, "fastsd35_images_total") == 0
        assert metric(url, 'fastsd35_errors_total{kind="timeout"}') == 1


def test_stop_drains_running_and_refuses_queued(pipe):
    """What SIGTERM does (tests/app/test_serve_process.py sends the real signal): requests not started get 503, the
    running pass finishes and is answered, new requests get 503."""
    from fastsd35.app.serve import Limits, Service, base_job
    from fastsd35.app.serve.command import background
    from fastsd35.app.serve.http import create_app

    gated = Gated(pipe)
    service = Service(base_job(pipe), "tiny", Limits())
    service.start([gated])
    with background(create_app(service)) as url, ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, url, {"prompt": "a", **FAST})
        assert gated.entered.wait(60)
        queued = pool.submit(post, url, {"prompt": "b", **FAST})
        wait_for(lambda: metric(url, "fastsd35_queue_requests") == 1, "one request queued")
        service.stop()
        assert error_of(queued.result()) == (503, "the server is shutting down: retry on another instance")
        assert error_of(post(url, {"prompt": "c", **FAST}))[0] == 503
        assert json.loads(get(url, "/health")[2]) == {"status": "stopping"}
        gated.gate.set()
        assert running.result()[0] == 200
        service.join()


def test_two_workers_share_one_queue(pipe):
    """One worker per device (here two on the CPU, sharing the pipeline): both take passes from the one queue at the
    same time, and each image is still its solo image."""
    from fastsd35.app.serve import Limits, Service, base_job
    from fastsd35.app.serve.command import background
    from fastsd35.app.serve.http import create_app

    a, b = Gated(pipe), Gated(pipe)
    service = Service(base_job(pipe), "tiny", Limits())
    service.start([a, b])
    with background(create_app(service)) as url, ThreadPoolExecutor(3) as pool:
        answers = [pool.submit(post, url, {"prompt": PROMPTS[0], "seed": s, **FAST}) for s in (1, 2, 3)]
        assert a.entered.wait(60) and b.entered.wait(60)  # both workers are inside a pass at once
        wait_for(lambda: metric(url, "fastsd35_queue_images") == 1, "the third request waiting")
        a.gate.set()
        b.gate.set()
        data = [json.loads(f.result()[2])["data"][0] for f in answers]
    service.stop()
    service.join()
    assert sorted(a.passes + b.passes) == [[1], [2], [3]] and a.passes and b.passes
    for d in data:
        np.testing.assert_array_equal(pixels(decode(d["b64_json"])), solo(pipe, PROMPTS[0], d["seed"]))


def test_bench_serve_part(pipe):
    """`fastsd35 bench --only serve`: registered by the CLI, its cases as README "Serve" says, and one wave over HTTP."""
    import fastsd35.app.cli  # noqa: F401  (the CLI registers the part)
    from fastsd35.app.serve import bench
    from fastsd35.benchmarks.cases import BUILDERS

    cases = BUILDERS["serve"]("cpu", ("large",), None, None)
    assert [(c.shape["concurrency"], c.images, c.part, c.id) for c in cases] == [
        (1, 4, "serve", "tiny-requests-c1"), (4, 8, "serve", "tiny-requests-c4"), (16, 32, "serve", "tiny-requests-c16")]
    assert [c.name for c in cases[0].contenders] == ["batching off", "batching on (max 8)"]
    with bench._contender(2, 4, 8, pipe) as prepared:
        images = prepared.fn()
    assert images.shape == (4, 64, 64, 3) and images.dtype == torch.uint8
    assert set(prepared.stages[0]) == {"p50", "p95"} and 0 < prepared.stages[0]["p50"] <= prepared.stages[0]["p95"]
    # batched (up to 8): the seed's image up to a batch's rounding
    assert np.abs(images[2].numpy().astype(np.int16) - solo(pipe, bench.PROMPT, 2, steps=4, size=64)).max() <= 1


def test_generate_takes_one_seed_per_image(pipe):
    """Pipeline.generate(seeds=...): what a pass of several requests uses; each seed is checked like --seed."""
    from fastsd35.errors import FastSD35Error

    kw = dict(steps=1, width=32, height=32, progress=False)
    for bad, message in (([1], "seeds must be a list of one seed per image (2)"), ([1, 2, 3], "one seed per image"),
                         (5, "one seed per image"), ([1, -1], "seed must be an integer"), ([1, "2"], "seed must be")):
        with pytest.raises(FastSD35Error, match=message.replace("(", r"\(").replace(")", r"\)")):
            pipe.generate(["a", "b"], ["", ""], seeds=bad, **kw)
    two = pipe.generate(["a", "b"], ["", ""], seeds=[9, 5], **kw)
    assert two.seeds == [9, 5]
    assert np.abs(pixels(two.images[1]) - solo(pipe, "b", 5)).max() <= 1  # seed 5's noise, in a batch of 2
