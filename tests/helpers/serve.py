"""Talking to a server under test over plain sockets (no HTTP client library between the test and the server), and
waiting for a state it reaches by itself."""

import json
import socket
import time


def raw(url, request: bytes, timeout: float = 60) -> tuple[int, dict, bytes]:
    """Send raw bytes over a socket; (status, headers, body) of the answer."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (413) and closed before reading everything
        data = b""
        while b"\r\n\r\n" not in data or len(data) < _length(data):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def _length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":")[1])
    return 1 << 62


def post(url, body, headers=None) -> tuple[int, dict, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = {"Host": "x", "Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
    return raw(url, f"POST /v1/images/generations HTTP/1.1\r\n{lines}Connection: close\r\n\r\n".encode() + data)


def get(url, path, headers=None):
    lines = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "x", **(headers or {})}.items())
    return raw(url, f"GET {path} HTTP/1.1\r\n{lines}Connection: close\r\n\r\n".encode())


def error_of(status_headers_body):
    status, _, body = status_headers_body
    return status, json.loads(body)["error"]["message"]


def metric(url, name, headers=None) -> float:
    status, _, body = get(url, "/metrics", headers)
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def wait_for(condition, what: str, limit_s: float = 60.0):
    """Wait for a state the server reaches by itself (not a timing assumption: the limit only ends a broken test)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)
