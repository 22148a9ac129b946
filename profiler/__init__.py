"""ditplan.profiler: run a DiT with dense attention and record what it does into Parquet traces."""
