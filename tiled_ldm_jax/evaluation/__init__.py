"""Evaluation code, apart from generation: seams, mask adherence, parity against the
original's outputs, and benchmarks. Nothing in the generation path imports it."""
