"""Backbones (ViT, Swin), the projection head and the baselines' prototype head (NNX)."""
from sove_jax.models.head import ProjectionHead, l2_normalize
from sove_jax.models.prototype_head import PrototypeHead, WeightNormPrototypes
from sove_jax.models.swin import SWIN_VARIANTS, Swin, create_swin
from sove_jax.models.vit import (ATTENTION, CUDNN_SEQ_MULTIPLE, POS_INTERPOLATIONS, VARIANTS, ViT,
                                 create_vit, dot_product_attention, interpolate_pos_embed)

# Every logical axis name a parameter carries (None marks an unsharded dim). "layers" is the
# stacked-block axis of scan_layers=True; "prototypes" the DINO/iBOT prototype axis; "classes" a
# classifier's output axis.
LOGICAL_AXES = ("embed", "mlp", "heads", "kv", "conv_in", "proj_hidden", "proj_out", "layers",
                "prototypes", "classes")

__all__ = [
    "ATTENTION", "CUDNN_SEQ_MULTIPLE", "LOGICAL_AXES", "POS_INTERPOLATIONS", "ProjectionHead",
    "PrototypeHead", "SWIN_VARIANTS", "Swin", "VARIANTS", "ViT", "WeightNormPrototypes",
    "create_swin", "create_vit", "dot_product_attention", "interpolate_pos_embed", "l2_normalize",
]
