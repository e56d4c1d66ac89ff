"""HTTP bodies to jobs: the OpenAI Images API request as a fastsd35 job, and errors in the OpenAI shape.

A request body is a JSON object. Its OpenAI fields (`prompt`, `n`, `size`, `response_format`, `model`, `user`) and
the fastsd35 fields a request may set (PER_REQUEST) become a job request (fastsd35.app.jobs.REQUEST_KEYS) merged
over the server's own (its preset, dtype, T5 settings), and `jobs.plan` checks it in its one pass, naming values by
their JSON names (`n`, not --batch-size). What loads a model or names a path (model files, dtype, LoRAs, ControlNets,
init images, prompt files, output folders, devices) is fixed when the server starts: a request that sets it is refused
(FIXED), so no request reads or writes a path it names. Nothing here needs the HTTP packages.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field, replace
from typing import Any

from ...errors import FastSD35Error
from ...pipeline.inputs import MAX_SEED
from .. import jobs

# The fastsd35 fields a request may set, as JSON names -> job request keys (the OpenAI fields are read apart).
PER_REQUEST = {"negative_prompt": "negative_prompt", "seed": "seed", "steps": "steps", "cfg": "cfg", "shift": "shift",
               "sampler": "sampler", "slg": "slg"}  # fmt: skip
OPENAI_FIELDS = ("prompt", "n", "size", "response_format", "model", "user")
# Job values fixed by the server's command line: a request naming one is refused with this reason.
FIXED = {key: "it is fixed when the server starts" for key in jobs.REQUEST_KEYS if key not in PER_REQUEST}
FIXED.update({"lora": "LoRAs are fused when the server starts (fastsd35 serve --lora)",
              "dtype": "the precision is fixed when the server starts (fastsd35 serve --dtype)",
              "init_image": "a server reads no file a request names (img2img is not served)",
              "control_image": "a server reads no file a request names (ControlNets are not served)",
              "prompts_file": "a server reads no file a request names: send the prompt",
              "out": "a server writes no file: the images come back in the response",
              "batch_size": "use n", "width": "use size (\"WIDTHxHEIGHT\")", "height": "use size (\"WIDTHxHEIGHT\")",
              "prompt": None, "model": None})  # fmt: skip
JSON_NAMES = {"batch_size": "n", "width": "size", "height": "size"}
MAX_USER_CHARS = 256
MAX_MESSAGE_CHARS = 1000  # a message quoting a huge value is cut: the answer stays small
SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")


def label(name: str) -> str:
    """A job value's name in messages: its JSON field."""
    return JSON_NAMES.get(name, name)


class ApiError(Exception):
    """An HTTP error with an OpenAI-shaped body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None, metric: str = "bad_request"):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers or {}
        self.metric = metric  # the kind counted in /metrics' errors

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 30] + f"... ({len(message)} characters)"
    return ApiError(400, message, param=param if param is None or len(param) <= 64 else None, code=code)


# -- the body -----------------------------------------------------------------------------------------------------


class _Duplicate(ValueError):
    pass


def _object(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Duplicate(f"the field {next(k for k in keys if keys.count(k) > 1)!r} is given twice")
    return dict(pairs)


def _constant(name):
    raise ValueError(f"{name} is not JSON")


def parse_body(data: bytes) -> dict:
    """The JSON object of a request body, or a 400: not UTF-8, not JSON (NaN and Infinity are not JSON), nested
    too deep, a number with too many digits, a field given twice, or not an object."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not UTF-8: {e}") from None
    try:
        body = json.loads(text, object_pairs_hook=_object, parse_constant=_constant)
    except _Duplicate as e:
        raise bad_request(f"the request body is not valid: {e}") from None
    except RecursionError:
        raise bad_request("the request body is not valid JSON: nested too deep") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, integers beyond Python's digit limit
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


# -- the request --------------------------------------------------------------------------------------------------


@dataclass
class ImageRequest:
    """A checked generation request: its job (prompts, seeds, settings, and the server's model), its size."""

    job: jobs.Job
    n: int
    seeds: list[int] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        return self.job.prompts[0]


def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a string, got {_type(value)}", name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{name} is not valid Unicode (it holds a lone surrogate)", name) from None
    return value


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type(value) -> str:
    return "null" if value is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                         list: "array", dict: "object"}.get(type(value), type(value).__name__)


def job_request(body: dict, served_model: str) -> dict:
    """The job request (jobs.REQUEST_KEYS) that an OpenAI body asks for, with its fields checked for what only the
    server knows (which are allowed, `size`, `model`, `response_format`, `user`); the values themselves are checked
    by jobs.plan."""
    unknown = sorted(k for k in body if k not in OPENAI_FIELDS and k not in PER_REQUEST)
    fixed = [k for k in unknown if k in FIXED and FIXED[k]]
    if fixed:
        raise bad_request(f"{fixed[0]} cannot be set in a request: {FIXED[fixed[0]]}", fixed[0])
    if unknown:
        allowed = ", ".join((*OPENAI_FIELDS, *PER_REQUEST))
        named = ", ".join(repr(k[:64]) for k in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise bad_request(f"unknown field{'s' if len(unknown) > 1 else ''} {named}: a request may set {allowed}",
                          unknown[0])
    if "prompt" not in body:
        raise bad_request("prompt is required", "prompt")
    request: dict[str, Any] = {"prompt": [_text(body["prompt"], "prompt")]}
    for name, key in PER_REQUEST.items():
        value = body.get(name)
        if value is not None:
            request[key] = _text(value, name) if name in ("negative_prompt", "sampler") else value
    if body.get("slg") is not None and not isinstance(body["slg"], bool):
        raise bad_request(f"slg must be true or false, got {_type(body['slg'])}", "slg")
    if body.get("n") is not None:
        request["batch_size"] = body["n"]
    size = body.get("size")
    if size is not None and size != "auto":
        match = SIZE.fullmatch(_text(size, "size"))
        if not match:
            raise bad_request(f"size must be \"WIDTHxHEIGHT\" (e.g. \"1024x1024\") or \"auto\", got {_short(size)}", "size")
        request["width"], request["height"] = int(match[1]), int(match[2])
    response_format = body.get("response_format")
    if response_format is not None and response_format != "b64_json":
        raise bad_request(f"response_format must be \"b64_json\" (this server keeps no files to link to), got "
                          f"{_short(response_format)}", "response_format")
    model = body.get("model")
    if model is not None and model != served_model:
        raise bad_request(f"model {_short(model)} is not served here: this server serves {served_model!r}", "model",
                          "model_not_found")
    user = body.get("user")
    if user is not None and len(_text(user, "user")) > MAX_USER_CHARS:
        raise bad_request(f"user is {len(user)} characters; the limit is {MAX_USER_CHARS}", "user")
    return request


def plan_request(body: dict, base: jobs.Job, served_model: str, max_images: int) -> ImageRequest:
    """A checked ImageRequest for `body`, planned by the job layer over the server's job `base` (its preset, dtype,
    T5 settings; its model, LoRAs and device as loaded). A request without a seed gets a random one (returned with
    each image and kept in its record). 400 (ApiError) with the job layer's one line for anything wrong."""
    request = job_request(body, served_model)
    request.update(preset=base.preset.name, dtype=base.dtype, t5_tokens=base.t5_tokens, no_t5=not base.t5 or None,
                   device=str(base.device))  # fmt: skip
    if request.get("seed") is None:
        request["seed"] = secrets.randbelow(1 << 31)
    try:
        job = jobs.plan(request, label=label)
    except FastSD35Error as e:
        raise bad_request(str(e)) from None
    n = job.batch_size
    if n > max_images:
        raise bad_request(f"n {n} is more images than this server queues (--max-queue {max_images}): lower n", "n")
    if job.seed + n - 1 > MAX_SEED:
        raise bad_request(f"seed {job.seed} + n - 1 is beyond the largest seed {MAX_SEED}: lower seed or n", "seed")
    # The model, its LoRAs and its device are the server's, as loaded (the request planned none of them).
    job = replace(job, model=base.model, hub=base.hub, loras=base.loras, device=base.device, memory=None,
                  text_encoder_device=base.text_encoder_device, graphs=base.graphs)  # fmt: skip
    return ImageRequest(job, n, [job.seed + i for i in range(n)])
