"""ditplan.policy: compile profiler traces into a versioned JSON plan (never imports torch)."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Plan": "ditplan.policy.plan",
    "PlanError": "ditplan.policy.plan",
    "AttentionSpec": "ditplan.policy.plan",
    "load_plan": "ditplan.policy.plan_io",
    "save_plan": "ditplan.policy.plan_io",
    "CompilerConfig": "ditplan.policy.config",
    "CompilerError": "ditplan.policy.config",
    "compile_policy": "ditplan.policy.compiler",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ditplan.policy' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
