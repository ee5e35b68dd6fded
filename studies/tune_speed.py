"""Recipes timed side by side (`python benchmarks/recipe_speed.py --arms=studies/tune_speed.py`):
the default and one change each, to size a recipe to a wall-time budget before it trains (a
study file: `python -m sove_jax.study --arms=studies/tune_speed.py --out=...` trains them)."""

ARMS = [
    ("default", {}),
    ("local2", {"data.num_local": 2}),
    ("local0", {"data.num_local": 0}),
    ("batch64", {"batch_size": 64}),
    ("batch256", {"batch_size": 256}),
    ("w192d4h3", {"model.width": 192, "model.num_heads": 3}),
    ("w96d6h3", {"model.width": 96, "model.depth": 6, "model.num_heads": 3}),
    ("p4_local16", {"model.patch_size": 4, "data.global_size": 28, "data.local_size": 16}),
    ("bf16", {"model.dtype": "bfloat16"}),
]


STUDY = dict(config="configs/default.py", same_budget=False, seeds=[0],
             stages=["train", dict(name="knn", kind="knn")],
             arms=[dict(name=name, group="Recipe speed", overrides=ov) for name, ov in ARMS])
