"""Wiring MeanCache into inference frameworks (diffusers)."""
