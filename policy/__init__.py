"""ditplan.policy: compile profiler traces into a versioned, shareable JSON plan (never imports torch)."""
