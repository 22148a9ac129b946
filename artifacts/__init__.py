"""Shipped artifacts: the reference model, saved traces, golden plans (package data)."""
