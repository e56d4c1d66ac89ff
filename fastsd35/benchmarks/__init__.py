"""What `fastsd35 bench` and the pytest-benchmark suite (bench/) measure: the cases and contenders (cases), many GPUs
(multi_gpu), and the timing, checking and reporting (suite)."""

from . import cases, multi_gpu  # noqa: F401,E402  (every part registers its cases: cases.BUILDERS)
