"""The benchmark suite (a package so that its conftest never shadows tests/conftest.py when both are collected)."""
