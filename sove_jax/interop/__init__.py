"""Weights in and out of PyTorch (DINO/iBOT key layout)."""
