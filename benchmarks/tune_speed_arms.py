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
