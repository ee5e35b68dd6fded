"""Vision Transformer backbones and the projection head (Flax NNX)."""
