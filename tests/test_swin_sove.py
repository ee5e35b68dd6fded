"""SOVE with a Swin backbone (`model.arch="swin"`): config checks, the mask grid, the train step,
a run from the data pipeline to a checkpoint, and the evaluators on its teacher.

The Swin here is smoke-sized: Swin-T's first two stages (depth 4: stages of 2 blocks) at width
16 with heads (2, 4), patch 4, window 4, on 32 px global and 16 px local crops. Stage grids at
32 px are 8 (window 4, shifted by 2) and 4 (one window, no shift), so the final grid, where the
[CLS] role is pooled, the patch loss compares tokens and the masks are drawn, is 4 x 4: one token
per 8 x 8 px. The 16 px local crops run at grids 4 and 2 (padded to the window).
"""
import jax
import numpy as np
import pytest

from configs import smoke
from sove_jax import configuration, sharding, state as state_lib, train
from sove_jax.models import Swin, ViT, network

FINAL = 4  # the final grid side at 32 px


def swin_config():
  c = smoke.get_config()
  c.model.update(arch="swin", variant="t", width=16, num_heads=2, depth=4, patch_size=4,
                 window_size=4, dtype="float32", drop_path=0.1)
  c.data.update(global_size=32, local_size=16, eval_resize=32, eval_crop=32)
  return c


# ------------------------------------------------------------------ config and the mask grid

def test_config_builds_a_swin_whose_final_grid_is_the_mask_grid():
  c = swin_config()
  configuration.validate(c, num_devices=8)
  assert network.swin_size(c.model) == (16, (2, 2), (2, 4))
  assert network.token_stride(c.model) == 8 and network.token_grid(c.model, 32) == FINAL
  _, params = network.abstract_network(c.model, 32)
  params = params.to_pure_dict()
  assert len(params["backbone"]["layers"]) == 2
  assert params["head"]["fc1"]["kernel"].shape[0] == 32  # the head reads the last stage's width
  mesh = sharding.make_mesh(c.mesh)
  assert train.batch_shapes(c, mesh)["mask"].shape == (c.batch_size, 2, FINAL * FINAL)
  # The paper's Swin-T/14: 7 x 7 final tokens at 224 px; a ViT's grid is its patch grid.
  swint = configuration.load("configs/swint.py")
  configuration.validate(swint, num_devices=8)
  assert network.token_grid(swint.model, 224) == 7
  assert network.token_grid(smoke.get_config().model, 28) == 4


def test_the_pipeline_draws_masks_at_the_final_grid():
  from sove_jax.data import pipeline, sources

  c = swin_config()
  stride = network.token_stride(c.model)
  configuration.validate_data(c.data, patch_size=4, global_batch_size=16, token_stride=stride)
  images = np.random.default_rng(0).integers(0, 256, (32, 28, 28, 3), dtype=np.uint8)
  stream = pipeline.TrainInput(sources.ArraySource(images, np.arange(32), name="arrays"), c.data,
                               patch_size=4, global_batch_size=16, seed=0, process_index=0,
                               process_count=1, token_stride=stride)
  batch = next(stream)
  assert batch["global"].shape == (16, 2, 32, 32, 3)
  assert batch["local"].shape == (16, 2, 16, 16, 3)
  assert batch["mask"].shape == (16, 2, FINAL * FINAL)
  # Block masks of ratio 0.3 on 16 cells: at most 4.8 cells each, and some cells masked.
  counts = batch["mask"].sum(-1)
  assert counts.max() <= 4 and counts.sum() > 0


@pytest.mark.parametrize("field,value,words", [
    ("model.arch", "convnext", "model.arch='convnext' is not one of 'vit', 'swin'"),
    ("model.variant", "ti", "not a Swin size"),
    ("model.depth", 3, r"does not end at a stage of Swin-T \(2, 2, 6, 2\): use one of \[2, 4"),
    ("model.num_heads", 3, "Swin width 16 must be divisible by its 3 heads"),
    ("model.window_size", 0, "model.window_size=0 must be >= 1"),
    ("model.attention", "cudnn", "is a ViT option"),
    ("model.scan_layers", True, "cannot be scanned"),
    # 36 px is 9 patches, but not a whole number of the 8 px final tokens.
    ("data.global_size", 36, "data.global_size=36 must be a multiple of 8 px"),
    ("data.local_size", 18, "data.local_size=18 must be a positive multiple of model.patch_size"),
    ("data.mask_min_patches", 17, r"must be in \[0, 16\] \(4x4 mask cells"),
])
def test_bad_swin_config_raises_one_sentence(field, value, words):
  c = swin_config()
  section, _, name = field.rpartition(".")
  c[section][name] = value
  with pytest.raises(configuration.ConfigError, match=words):
    configuration.validate(c, num_devices=8)


def test_every_local_crop_that_is_whole_patches_runs():
  """Local crops only need whole patches: a grid that is not a multiple of the window is padded,
  an odd one is padded by patch merging; each gives one [CLS]-role token and the final tokens."""
  from flax import nnx

  c = swin_config()
  graphdef, params = nnx.split(nnx.eval_shape(lambda: network.build_backbone(c.model, 32,
                                                                             nnx.Rngs(0))))
  for size in (4, 8, 12, 16, 20, 24, 36, 44):
    out = jax.eval_shape(lambda p, x: nnx.merge(graphdef, p)(x), params,
                         jax.ShapeDtypeStruct((1, size, size, 3), np.float32))
    side = -(-(size // 4) // 2)
    assert out.shape == (1, 1 + side * side, 32), size


# ------------------------------------------------------------------ SOVE steps, then evaluation

def _leaf(tree, path):
  for key in path:
    tree = tree[key]
  return np.asarray(tree)


@pytest.mark.slow
def test_sove_trains_a_swin_and_the_evaluators_read_it(tmp_path, monkeypatch):
  """`train_and_evaluate` on Fashion-MNIST with the Swin, masks from the pipeline at the final
  grid: every step's loss is finite, every backbone tensor the loss reaches moves (the mask
  token, relative position tables, patch merging), the teacher follows by EMA. Then the
  evaluators on the checkpoint: the backbone loads as a Swin with the trained teacher's
  weights, and k-NN and the linear probe run on its features."""
  from flax import nnx

  from sove_jax import checkpoint, reporting
  from sove_jax.data import pipeline
  from sove_jax.evaluate import backbone, features, knn, linear

  losses = []
  progress_line = reporting.progress_line

  def record(step, total, scalars):
    losses.append(scalars["train/loss"])
    return progress_line(step, total, scalars)

  monkeypatch.setattr(reporting, "progress_line", record)
  c = swin_config()
  c.total_steps = 3
  workdir = str(tmp_path / "swin")
  train.train_and_evaluate(c, workdir)
  assert len(losses) == 3 and np.isfinite(losses).all(), losses

  mesh = sharding.make_mesh(c.mesh)
  setup = train.build(c, mesh, steps_per_epoch=1)
  start = jax.device_get(state_lib.create(c, setup.tx, setup.layout, setup.image_size))
  ckpt = checkpoint.Checkpointer(workdir, save_every=1, keep=1)
  saved = ckpt.restore(state_lib.abstract_with_shardings(setup.layout)).state
  ckpt.close()
  end = jax.device_get(saved)
  assert int(end.step) == 3
  for path in (("mask_token",), ("patch_embed", "kernel"),
               ("layers", 0, "blocks", 1, "attn", "relative_position_bias_table"),
               ("layers", 0, "downsample", "reduction"),
               ("layers", 1, "blocks", 1, "mlp", "fc2", "kernel"), ("norm", "scale")):
    before = _leaf(start.student["backbone"], path)
    assert not np.allclose(before, _leaf(end.student["backbone"], path)), path
    assert not np.array_equal(before, _leaf(end.teacher["backbone"], path)), path

  config, model = backbone.load_backbone(workdir)
  assert config.model.arch == "swin" and isinstance(model, Swin)
  assert model.windows == ((4, 2), (4, 0))
  loaded = nnx.state(model, nnx.Param).to_pure_dict()
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(end.teacher["backbone"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert features.default_probe_convention(config.model) == "last4_cls"

  subset = dict(max_train_examples=512, max_eval_examples=256, batch_size=128)
  results = knn.evaluate_knn(config, model, input_fn=pipeline.eval_input, ks=(10, 20), **subset)
  assert set(results["full"]) == {10, 20}
  assert all(30.0 < acc <= 100.0 for acc in results["full"].values()), results  # chance: 10
  probe = linear.evaluate_linear(config, model, input_fn=pipeline.eval_input, lrs=(0.1,),
                                 epochs=10, probe_batch_size=128, **subset)
  assert probe["convention"] == "last4_cls" and 30.0 < probe["top1"] <= 100.0, probe
  # last4_cls of this Swin: the token averages of its 4 blocks, 2 of width 16 and 2 of 32.
  feats = features.probe_features(model, "last4_cls")(np.zeros((2, 32, 32, 3), np.float32))
  assert feats.shape == (2, 16 + 16 + 32 + 32)


def test_vit_networks_are_unchanged_by_the_arch_field():
  """A config without `model.arch` (a workdir from before it) builds the same ViT network as
  `arch="vit"`: same graph, same parameters from the same key."""
  c = smoke.get_config()
  old = smoke.get_config()
  del old.model["arch"]
  del old.model["window_size"]
  assert network.arch(old.model) == "vit"
  a = network.init_params(c.model, 28, jax.random.key(0))
  b = network.init_params(old.model, 28, jax.random.key(0))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  g1, _ = network.abstract_network(c.model, 28)
  g2, _ = network.abstract_network(old.model, 28)
  assert g1 == g2
  from flax import nnx
  assert isinstance(network.build_backbone(c.model, 28, nnx.Rngs(0)), ViT)
