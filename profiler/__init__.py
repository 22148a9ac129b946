"""ditplan.profiler: run a DiT with dense attention and record what it does into Parquet traces."""

from __future__ import annotations

__all__ = ["ProfileConfig", "profile_pipeline", "profile_transformer_calls"]


def __getattr__(name: str):
    # Lazy: `import ditplan.profiler.schema` (the policy compiler's path) must not import torch.
    if name == "ProfileConfig":
        from ditplan.profiler.config import ProfileConfig

        return ProfileConfig
    if name in ("profile_pipeline", "profile_transformer_calls"):
        from ditplan.profiler import run

        return getattr(run, name)
    raise AttributeError(f"module 'ditplan.profiler' has no attribute {name!r}")
