"""What the kernels need from Triton's CPU interpreter (TRITON_INTERPRET=1) on every Triton they support (3.6 on).

The interpreter holds every scalar as a NumPy array of shape (1,) and gives `range()` a loop bound through
`tensor.__index__`. Triton 3.6 implements that as `int(array)`, which NumPy 2.4 refuses for arrays that are not 0-d
("only 0-dimensional arrays can be converted to Python scalars"), so every kernel with a loop over a runtime bound
(the attention's key tiles) fails there; later Tritons squeeze the array first. `fix_loop_bounds()` makes 3.6 do
the same: it wraps the interpreter's per-call patch of `tl.tensor` so that `__index__` takes the one element of a
one-element array. Nothing changes for compiled kernels, or where `__index__` already works.
"""

from __future__ import annotations

import numpy as np


def _index(tensor) -> int:
    data = np.asarray(tensor.handle.data)
    if data.size != 1:
        raise TypeError(f"only a scalar can be a loop bound or an index, got a block of shape {data.shape}")
    return int(data.reshape(()))


def _needs_fix(interpreter) -> bool:
    """Whether this interpreter's `__index__` refuses a (1,)-shaped scalar (Triton 3.6 with NumPy 2.4)."""
    from triton.language import core

    scope = interpreter._LangPatchScope()
    try:
        interpreter._patch_lang_tensor(core.tensor, scope)
        probe = core.tensor.__new__(core.tensor)
        probe.handle = interpreter.TensorHandle(np.array([3], dtype=np.int32), core.int32)
        try:
            probe.__index__()
        except TypeError:
            return True
        return False
    finally:
        scope.restore()


def fix_loop_bounds() -> bool:
    """Patch the interpreter when it needs it (module docstring); True when it did. Call once, after importing
    triton with TRITON_INTERPRET set."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "fixed_loop_bounds", False) or not hasattr(interpreter, "_LangPatchScope"):
        return False
    if not _needs_fix(interpreter):
        return False

    def patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    patch_lang_tensor.fixed_loop_bounds = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
