"""ditplan.runtime: execute a plan on a live diffusers pipeline (sparse attention, caching)."""
