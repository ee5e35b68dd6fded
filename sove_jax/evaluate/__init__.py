"""Evaluation protocols: k-NN, low-shot k-NN, linear probe on frozen features."""
