"""`fastsd35 serve`: an OpenAI-compatible image server (README "Serve").

The server is a front end like the CLI: each HTTP request becomes a job (fastsd35.app.jobs: the same schema, limits
and one-line messages, a 400 instead of exit status 2) and the job's images come back as PNGs with the CLI's records.

- schema: OpenAI bodies to job requests; errors in the OpenAI shape.
- batching: the bounded queue, the passes and the workers that run them (one per device).
- service: the server's state: its job, pipelines, queue, metrics; the admission of a request.
- metrics: the Prometheus text of GET /metrics.
- http: the Starlette routes, the bearer key, the body limit (the only module that needs the `serve` extra besides
  the command's uvicorn).
- command: `fastsd35 serve`'s arguments, the socket, the model loading, the signals.
- bench: `fastsd35 bench --only serve`.

`app(pipe)` gives the ASGI app for a loaded pipeline, to embed in another server.
"""

from __future__ import annotations

from ...errors import FastSD35Error
from .. import jobs
from .service import Limits, Service

SERVER_PACKAGES = ("starlette", "uvicorn")


def missing_packages() -> list[str]:
    """The server's packages that are not installed (the `serve` extra)."""
    import importlib.util

    return [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]


def base_job(pipe, model=None) -> jobs.Job:
    """The job a loaded pipeline serves: its preset, T5 settings and device, and `model` (the path or Hub name it was
    loaded from, which the PNG records name; None for the built-in tiny presets)."""
    if pipe.controlnet is not None:
        raise FastSD35Error("a pipeline with a ControlNet cannot be served (requests send no control image)")
    request = {"preset": pipe.preset.name, "model": None if model is None else str(model), "prompt": ["-"],
               "device": str(pipe.device), "t5_tokens": pipe.text_encoders.t5_tokens,
               "no_t5": True if pipe.text_encoders.t5 is None else None}  # fmt: skip
    return jobs.plan(request, label=lambda name: name)


def app(pipe, *, model=None, name: str | None = None, max_batch: int = 1, max_queue: int = Limits.max_queue,
        window_s: float = Limits.window_s, max_body_bytes: int = Limits.max_body_bytes,
        request_timeout_s: float = Limits.request_timeout_s, api_key: str | None = None):
    """The ASGI app serving `pipe` (a loaded fastsd35.Pipeline), for any ASGI server (uvicorn, hypercorn, ...).
    `model`: what the PNG records name as the model (the path or Hub name `pipe` was loaded from; None for the
    built-in tiny presets); `name`: the model id of the API (default: the preset's name). The other arguments are
    `fastsd35 serve`'s limits (README "Serve"). Its workers start and stop with the app's lifespan."""
    missing = missing_packages()
    if missing:
        raise FastSD35Error(f"the server needs {', '.join(missing)}: pip install 'fastsd35[serve]'")
    from .http import create_app, worker_lifespan

    limits = Limits(max_batch, max_queue, window_s, max_body_bytes, request_timeout_s).check()
    service = Service(base_job(pipe, model), name or pipe.preset.name, limits, api_key=check_api_key(api_key, "api_key"))
    return create_app(service, lifespan=lambda _: worker_lifespan(service, [pipe]))


def check_api_key(key, what: str) -> str | None:
    """None (no key) or a key that can travel in an HTTP header: printable ASCII without spaces, 8 to 4096
    characters."""
    if key is None:
        return None
    if not isinstance(key, str) or not 8 <= len(key) <= 4096 or not all("!" <= c <= "~" for c in key):
        raise FastSD35Error(f"{what} must be 8 to 4096 printable ASCII characters without spaces")
    return key


__all__ = ["Limits", "Service", "app", "base_job", "check_api_key", "missing_packages"]
