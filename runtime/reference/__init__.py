"""The built-in reference video DiT: procedural clips, caption encoder, pipeline."""
