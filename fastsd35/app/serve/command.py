"""`fastsd35 serve`: plan the server's job from its command line (as `fastsd35 run` plans one), listen, load the
model once per device in the background (GET /health says "loading" until then), serve, and drain on SIGTERM or
Ctrl-C: stop accepting, answer 503 to requests not started, finish the running passes, exit 0."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

from ...errors import FastSD35Error
from ...pipeline import memory
from ...pipeline.inputs import DTYPES, MAX_BATCH, check_device
from ...pipeline.presets import PRESETS
from .. import jobs
from . import check_api_key, missing_packages
from .service import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE, DEFAULT_REQUEST_TIMEOUT_S, DEFAULT_WINDOW_S, Limits, Service

API_KEY_VARIABLE = "FASTSD35_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_arguments(parser: argparse.ArgumentParser):
    model = parser.add_argument_group("the model (loaded once)")
    model.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (read from the checkpoint when it can be)")
    model.add_argument("--model", help="Hugging Face Hub name ORG/NAME[@REVISION], checkpoint file, folder with the "
                                       "official files, or diffusers folder (default: models/)")
    model.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="fuse a LoRA at load (repeatable)")
    model.add_argument("--dtype", choices=DTYPES, help="transformer/VAE precision (default bf16 on CUDA, fp32 on CPU)")
    model.add_argument("--device", action="append",
                       help="cuda, cuda:N or cpu (default: cuda when available); repeat to serve from several devices, "
                            "one worker and one copy of the model each")
    model.add_argument("--text-encoder-device", default="auto", help="where CLIP/T5 run: auto, cuda or cpu")
    model.add_argument("--no-graphs", action="store_true", help="run the transformer eagerly instead of from CUDA graphs")
    model.add_argument("--t5-tokens", type=int, help="longest T5 prompt in tokens (default 256, max 512)")
    model.add_argument("--no-t5", action="store_true", default=None, help="do not load T5-XXL (zeros in its place)")
    model.add_argument("--served-model-name", help="the model id clients name (default: the preset's name)")
    http = parser.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    http.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    http.add_argument("--api-key", help=f"require Authorization: Bearer KEY on every endpoint but /health (or set "
                                        f"{API_KEY_VARIABLE}, which keeps the key out of the process list)")
    http.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="uvicorn's log level (default info)")
    limits = parser.add_argument_group("batching and limits")
    limits.add_argument("--max-batch", type=int, default=1,
                        help=f"images per forward pass, from several requests (1 to {MAX_BATCH}; default 1: every "
                             "image bit for bit as `fastsd35 run --from-png` makes it; above 1 a batched image may "
                             "differ from the same request served alone by float rounding)")
    limits.add_argument("--batch-window-ms", type=float, default=DEFAULT_WINDOW_S * 1e3,
                        help=f"how long a worker waits to fill a pass (default {DEFAULT_WINDOW_S * 1e3:g} ms)")
    limits.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help=f"images waiting before requests get 429 (default {DEFAULT_MAX_QUEUE})")
    limits.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help=f"largest request body (default {DEFAULT_MAX_BODY_BYTES})")
    limits.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                        help=f"seconds a request may take, queue included (default {DEFAULT_REQUEST_TIMEOUT_S:g})")


def _label(name: str) -> str:
    return {"max_batch": "--max-batch", "max_queue": "--max-queue", "window_s": "--batch-window-ms (in seconds)",
            "max_body_bytes": "--max-body-bytes", "request_timeout_s": "--request-timeout"}.get(name, jobs.cli_label(name))


def plan(args) -> tuple[jobs.Job, list, Limits, str | None]:
    """The server's job, its devices, its limits and its API key, all checked before anything is loaded."""
    limits = Limits(args.max_batch, args.max_queue, args.batch_window_ms / 1e3, args.max_body_bytes,
                    args.request_timeout).check(_label)  # fmt: skip
    devices = args.device or [None]
    request = {"preset": args.preset, "model": args.model, "lora": args.lora, "dtype": args.dtype,
               "device": devices[0], "text_encoder_device": None if args.text_encoder_device == "auto" else
               args.text_encoder_device, "graphs": False if args.no_graphs else None, "t5_tokens": args.t5_tokens,
               "no_t5": True if args.no_t5 else None, "prompt": ["-"], "batch_size": limits.max_batch}  # fmt: skip
    job = jobs.plan(request)
    checked = [job.device] + [check_device(d, "--device") for d in devices[1:]]
    if len(set(checked)) != len(checked):
        raise FastSD35Error(f"--device names {', '.join(map(str, checked))}: each device once")
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_VARIABLE)
    key = check_api_key(key, "--api-key" if args.api_key is not None else API_KEY_VARIABLE)
    if args.served_model_name is not None and not (0 < len(args.served_model_name) <= 256):
        raise FastSD35Error("--served-model-name must be 1 to 256 characters")
    return job, checked, limits, key


def listen(host: str, port: int) -> socket.socket:
    """A bound socket (uvicorn listens on it), or one line saying why not."""
    if not 0 <= port <= 65535:
        raise FastSD35Error(f"--port must be from 0 to 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise FastSD35Error(f"--host {host!r}: {e}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise FastSD35Error(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve_command(args) -> int:
    missing = missing_packages()
    if missing:
        raise FastSD35Error(f"fastsd35 serve needs {', '.join(missing)}: pip install 'fastsd35[serve]'")
    job, devices, limits, key = plan(args)
    if job.memory:
        for device in devices:
            memory.preflight(job.memory, device, tuple(DTYPES))
    import uvicorn

    from .http import create_app

    name = args.served_model_name or job.preset.name
    service = Service(job, name, limits, api_key=key)
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    where = f"[{host}]" if ":" in host else host
    print(f"fastsd35: serving {name} on http://{where}:{port} (loading the model on {', '.join(map(str, devices))})",
          flush=True)
    config = uvicorn.Config(create_app(service), log_level=args.log_level, lifespan="off",
                            limit_concurrency=4 * limits.max_queue + 64, timeout_graceful_shutdown=None)
    server = _Server(config, service)
    failure: list[str] = []
    loader = threading.Thread(target=_load, args=(job, devices, service, server, failure), daemon=True,
                              name="fastsd35-loader")
    loader.start()
    server.run(sockets=[sock])
    service.stop()
    service.join()
    if failure:
        print(f"fastsd35: error: {failure[0]}", file=sys.stderr)
        return 2
    print("fastsd35: stopped", file=sys.stderr)
    return 0


def _load(job, devices, service: Service, server, failure: list):
    try:
        pipes = []
        for device in devices:
            pipe = jobs.load(job, device=device)
            jobs.check_prompts_fit(job, pipe)
            pipes.append(pipe)
        service.start(pipes)
        print(f"fastsd35: ready ({', '.join(f'{k} {v:.1f} s' for k, v in pipes[0].timings.items())})", flush=True)
    except FastSD35Error as e:
        failure.append(str(e))
        service.failed()
        server.should_exit = True
    except BaseException:
        service.failed()
        server.should_exit = True
        raise


class _Server:
    """uvicorn's Server, draining the service on SIGTERM/SIGINT/SIGHUP and then returning (exit 0) instead of dying
    of the signal as uvicorn does after its shutdown."""

    def __new__(cls, config, service):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                service.stop()
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True
                self.should_exit = True

            def capture_signals(self):
                return _handlers(self.handle_exit)

        return Server(config)


class _handlers:
    """Install `handler` for SIGINT, SIGTERM and SIGHUP while inside (main thread only), then restore the old ones."""

    def __init__(self, handler):
        self.handler, self.previous = handler, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
                if sig is not None:
                    self.previous[sig] = signal.signal(sig, self.handler)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class background:
    """Serve an ASGI app with uvicorn from a thread on a free loopback port, for the tests and the benchmark:
    `with background(app) as url: ...`; leaving drains it (the app's lifespan shutdown) and joins the thread."""

    def __init__(self, app, host: str = "127.0.0.1", log_level: str = "warning"):
        import uvicorn

        self.sock = listen(host, 0)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="fastsd35-background-server")
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread stopped while starting")
            self.thread.join(0.01)
        return self.url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()


__all__ = ["add_arguments", "background", "listen", "plan", "serve_command"]
