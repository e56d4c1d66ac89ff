"""diffusers, the independent reference: the tests that compare with it skip, saying why, where it is not installed
(the GPU machine has none); nothing else needs it."""

import pytest

REASON = "diffusers is not installed: the comparison with the independent reference (diffusers) is skipped"


def require_diffusers():
    """The diffusers module, or a skip of the calling test."""
    return pytest.importorskip("diffusers", reason=REASON)


def diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True
