"""Model-family adapters: the only code that knows diffusers transformer classes."""
