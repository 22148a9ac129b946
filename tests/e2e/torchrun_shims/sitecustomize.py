"""Loaded by every process of a test's torchrun launch (on PYTHONPATH): the CPU shims."""

from tests.gloo import apply_cpu_shims

apply_cpu_shims()
