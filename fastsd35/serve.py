"""The server's Python API: `fastsd35.serve.app(pipe)` is the ASGI app of `fastsd35 serve` for a loaded pipeline, to run
under any ASGI server or embed in another app (README "Serve"). It lives in fastsd35.app.serve."""

from .app.serve import Limits, app

__all__ = ["Limits", "app"]
