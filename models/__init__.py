"""Diffusion models, data sources, the micro-batch function and the quality score."""
