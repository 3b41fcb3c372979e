"""Checkpoint reading, MLP discovery, observers, scales and int8 weight quantization."""
