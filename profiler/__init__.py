"""ditplan.profiler: run a DiT with dense attention and record what it does into Parquet traces.

Entry points live in their modules: ``ditplan.profiler.config.ProfileConfig`` and
``ditplan.profiler.run.profile_pipeline`` / ``profile_transformer_calls``; this package imports
none of them, so ``ditplan.profiler.schema`` (the policy compiler's path) stays torch-free.
"""
