"""Weights to and from PyTorch (sove_jax/interop/): the DINO layout, weight files, and released
weights (DINO's, iBOT's and the authors' key layouts, in files written here) evaluated.

The parity reference is a PyTorch ViT forward written here from the DINO layout alone (it shares
no code with the exporter), so a wrong transpose or reshape in the export shows up as a wrong
output. Models are tiny (width 64, depth 2, 32 px, patch 8) with every parameter random, so
no bias or LayerNorm scale is a trivially invertible 0 or 1.
"""
import argparse
import json
import math
import os
import struct
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sove_jax.interop import released
from sove_jax.interop import torch_weights as tw
from sove_jax.interop import weight_files as wf
from sove_jax.models.vit import create_vit

try:
  import torch
  F = torch.nn.functional
except ImportError:  # the tests that need no PyTorch still run
  torch = F = None
needs_torch = pytest.mark.skipif(
    torch is None, reason="PyTorch is not installed; for the CPU build: pip install torch "
                          "--index-url https://download.pytorch.org/whl/cpu")

SMALL = dict(width=64, depth=2, num_heads=4, patch_size=8, image_size=32, dtype=jnp.float32)


def _vit(seed, *, scan_layers=False, **overrides):
  """A small float32 ViT with random parameters (LayerNorm scales 1 + N(0, 0.1), everything
  else N(0, 0.1)), filled from NumPy into an abstract model: no eager init to compile."""
  model = nnx.eval_shape(lambda: create_vit("s", rngs=nnx.Rngs(0), scan_layers=scan_layers,
                                            **{**SMALL, **overrides}))
  state = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(seed)
  values = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(
          (path[-1].key == "scale") + 0.1 * rng.standard_normal(x.shape), jnp.float32),
      nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, values)
  nnx.update(model, state)
  return model


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _bits(tree):
  """Leaves as uint32 bit patterns, keyed by path: equality here is bitwise equality."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): np.asarray(x, np.float32).view(np.uint32) for p, x in flat}


def _assert_bitwise_equal(a, b):
  bits_a, bits_b = _bits(a), _bits(b)
  assert bits_a.keys() == bits_b.keys()
  for k in bits_a:
    np.testing.assert_array_equal(bits_a[k], bits_b[k], err_msg=k)


def _torch_vit(sd, images_nchw, *, num_heads, mask=None, interpolation="size"):
  """Reference forward of a DINO/iBOT ViT from its state dict: tokens after the final norm.

  Position embeddings are resized bicubically by `F.interpolate(size=grid)` ("size") or, as
  DINO's, iBOT's and SOP's `interpolate_pos_encoding`, by `scale_factor=(grid + 0.1) / n`
  ("scale_factor"); masked patches take `masked_embed` before the position embedding, as iBOT.
  """
  t = {k: torch.from_numpy(v) for k, v in sd.items()}
  x = F.conv2d(images_nchw, t["patch_embed.proj.weight"], t["patch_embed.proj.bias"],
               stride=t["patch_embed.proj.weight"].shape[-1])
  b, d, gh, gw = x.shape
  x = x.flatten(2).transpose(1, 2)
  if mask is not None:
    x = torch.where(mask[..., None], t["masked_embed"].to(x.dtype), x)
  pos = t["pos_embed"]
  n = int(math.isqrt(pos.shape[1] - 1))
  patch_pos = pos[:, 1:]
  if (gh, gw) != (n, n):
    grid = patch_pos.reshape(1, n, n, d).permute(0, 3, 1, 2)
    if interpolation == "size":
      grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    else:
      grid = F.interpolate(grid, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic",
                           align_corners=False)
      assert grid.shape[-2:] == (gh, gw)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, d)
  x = torch.cat([t["cls_token"].expand(b, -1, -1), x], dim=1)
  x = x + torch.cat([pos[:, :1], patch_pos], dim=1)
  tokens, head_dim = x.shape[1], d // num_heads
  depth = len({k.split(".")[1] for k in t if k.startswith("blocks.")})
  for i in range(depth):
    p = lambda name: t[f"blocks.{i}.{name}"]
    h = F.layer_norm(x, (d,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
    qkv = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias"))
    q, k, v = qkv.reshape(b, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * head_dim ** -0.5).softmax(dim=-1)
    h = (attn @ v).transpose(1, 2).reshape(b, tokens, d)
    x = x + F.linear(h, p("attn.proj.weight"), p("attn.proj.bias"))
    h = F.layer_norm(x, (d,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
    h = F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias")))  # exact (erf) GELU
    x = x + F.linear(h, p("mlp.fc2.weight"), p("mlp.fc2.bias"))
  return F.layer_norm(x, (d,), t["norm.weight"], t["norm.bias"], eps=1e-6)


@pytest.fixture(scope="module")
def model():
  return _vit(0)


@pytest.fixture(scope="module")
def state_dict(model):
  return tw.to_torch_state_dict(model)


# ------------------------------------------------------------------ parity with PyTorch

@needs_torch
@pytest.mark.parametrize("height,width,masked", [
    (32, 32, False),   # trained size: pos_embed used as is
    (32, 32, True),    # mask token <-> masked_embed
    (40, 48, False),   # other (non-square) size: both sides resize pos_embed bicubically
])
def test_torch_forward_matches_jax_forward(model, state_dict, height, width, masked):
  images = jax.random.normal(jax.random.key(3), (2, height, width, 3), jnp.float32)
  grid = (height // 8) * (width // 8)
  mask = jax.random.bernoulli(jax.random.key(4), 0.4, (2, grid)) if masked else None
  want = np.asarray(model(images, mask))
  got = _torch_vit(state_dict, torch.tensor(np.asarray(images).transpose(0, 3, 1, 2)),
                   num_heads=SMALL["num_heads"],
                   mask=None if mask is None else torch.tensor(np.asarray(mask)))
  got = got.numpy()
  assert got.shape == want.shape == (2, 1 + grid, SMALL["width"])
  assert np.abs(got[:, 0] - want[:, 0]).max() < 1e-4   # [CLS]
  assert np.abs(got[:, 1:] - want[:, 1:]).max() < 1e-4  # patches


@needs_torch
@pytest.mark.parametrize("pos_interpolation,torch_interpolation", [
    ("dino", "scale_factor"), ("size", "size")])
def test_torch_forward_matches_at_96px_from_224px_weights(pos_interpolation, torch_interpolation):
  """ViT/16 weights of 224 px (a 14 x 14 position grid) run on 96 px crops (6 x 6), the local
  crops of every recipe: each interpolation mode matches its PyTorch counterpart, and the two
  modes give features far enough apart that this test tells them apart."""
  model = _vit(31, patch_size=16, image_size=224, pos_interpolation=pos_interpolation)
  sd = tw.to_torch_state_dict(model)
  images = jax.random.normal(jax.random.key(5), (2, 96, 96, 3), jnp.float32)
  want = np.asarray(model(images))
  nchw = torch.tensor(np.asarray(images).transpose(0, 3, 1, 2))
  got = _torch_vit(sd, nchw, num_heads=SMALL["num_heads"], interpolation=torch_interpolation)
  assert got.shape == want.shape == (2, 1 + 36, SMALL["width"])
  assert np.abs(got.numpy() - want).max() < 1e-4
  other = "size" if torch_interpolation == "scale_factor" else "scale_factor"
  far = _torch_vit(sd, nchw, num_heads=SMALL["num_heads"], interpolation=other).numpy()
  assert np.abs(far - want).max() > 1e-2


@needs_torch
def test_imported_weights_resize_position_embeddings_as_their_code():
  """Importing makes the official interpolation the model's, so an imported checkpoint's
  96 px features are those of the PyTorch code; pos_interpolation=None keeps the model's."""
  sd = tw.to_torch_state_dict(_vit(32, patch_size=16, image_size=224))
  target = _vit(33, patch_size=16, image_size=224)
  assert target.pos_interpolation == "size"
  tw.import_weights(sd, target)
  assert target.pos_interpolation == "dino"
  images = jax.random.normal(jax.random.key(6), (2, 96, 96, 3), jnp.float32)
  got = _torch_vit(sd, torch.tensor(np.asarray(images).transpose(0, 3, 1, 2)),
                   num_heads=SMALL["num_heads"], interpolation="scale_factor").numpy()
  assert np.abs(got - np.asarray(target(images))).max() < 1e-4
  kept = tw.import_weights(sd, _vit(34, patch_size=16, image_size=224), pos_interpolation=None)
  assert kept.pos_interpolation == "size"
  with pytest.raises(ValueError, match="pos_interpolation"):
    tw.import_weights(sd, target, pos_interpolation="bilinear")


def test_state_dict_has_dino_keys_shapes_and_order(state_dict):
  d, depth = SMALL["width"], SMALL["depth"]
  block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
           "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
           "mlp.fc2.weight", "mlp.fc2.bias"]
  expected = (["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
              + [f"blocks.{i}.{s}" for i in range(depth) for s in block]
              + ["norm.weight", "norm.bias", "masked_embed"])
  assert list(state_dict) == expected
  assert state_dict["patch_embed.proj.weight"].shape == (d, 3, 8, 8)
  assert state_dict["blocks.1.attn.qkv.weight"].shape == (3 * d, d)
  assert state_dict["blocks.1.mlp.fc1.weight"].shape == (4 * d, d)
  assert state_dict["pos_embed"].shape == (1, 1 + 16, d)
  assert all(v.dtype == np.float32 for v in state_dict.values())
  assert "masked_embed" not in tw.to_torch_state_dict(_params(_vit(0)), mask_token=False)


# ------------------------------------------------------------------ exact round trips

@pytest.mark.parametrize("scan_layers", [False, True])
def test_jax_torch_jax_is_bitwise_exact(scan_layers):
  source, target = _vit(1, scan_layers=scan_layers), _vit(2, scan_layers=scan_layers)
  before = _params(source)
  assert not np.array_equal(before["norm"]["scale"], _params(target)["norm"]["scale"])
  back = tw.from_torch_state_dict(tw.to_torch_state_dict(source), target)
  _assert_bitwise_equal(back, before)
  # An abstract target (no allocation) gives the same parameters.
  abstract = nnx.eval_shape(lambda: create_vit("s", rngs=nnx.Rngs(0), scan_layers=scan_layers,
                                               **SMALL))
  _assert_bitwise_equal(tw.from_torch_state_dict(tw.to_torch_state_dict(source), abstract),
                        before)


def test_scan_and_loop_layouts_export_the_same_state_dict(model):
  loop = _params(model)
  scan_model = _vit(5, scan_layers=True)
  stacked = dict(loop, blocks=jax.tree.map(lambda *xs: jnp.stack(xs),
                                           *[loop["blocks"][i] for i in range(SMALL["depth"])]))
  state = nnx.state(scan_model, nnx.Param)
  nnx.replace_by_pure_dict(state, stacked)
  nnx.update(scan_model, state)
  a, b = tw.to_torch_state_dict(model), tw.to_torch_state_dict(scan_model)
  assert list(a) == list(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@needs_torch
def test_round_trip_through_pth_and_safetensors_files(tmp_path, model, state_dict):
  wf.save_pth(state_dict, str(tmp_path / "w.pth"))
  wf.save_safetensors(state_dict, str(tmp_path / "w.safetensors"), metadata={"step": 7})
  loaded = torch.load(tmp_path / "w.pth", weights_only=True)  # what a PyTorch user does
  assert list(loaded) == list(state_dict)
  assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in loaded.values())
  assert wf.safetensors_metadata(str(tmp_path / "w.safetensors")) == {"step": "7"}
  for name in ("w.pth", "w.safetensors"):
    target = _vit(9)
    tw.import_weights(str(tmp_path / name), target)
    _assert_bitwise_equal(_params(target), _params(model))


def test_safetensors_bytes_follow_the_format(tmp_path):
  """Parsed here by hand, so the file is checked against the format, not against the reader."""
  import ml_dtypes

  arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5,
            "a": np.array([1.5, -2.25], ml_dtypes.bfloat16), "c": np.zeros((0, 4), np.float32)}
  path = str(tmp_path / "x.safetensors")
  wf.save_safetensors(arrays, path, metadata={"k": "v"})
  raw = open(path, "rb").read()
  (n,) = struct.unpack("<Q", raw[:8])
  assert (8 + n) % 8 == 0
  header = json.loads(raw[8:8 + n])
  assert header["__metadata__"] == {"k": "v"}
  assert header["b"]["dtype"] == "F32" and header["b"]["shape"] == [2, 3]
  assert header["a"]["dtype"] == "BF16" and header["c"]["shape"] == [0, 4]
  begin, end = header["b"]["data_offsets"]
  assert raw[8 + n + begin:8 + n + end] == arrays["b"].astype("<f4").tobytes()
  loaded = wf.load_safetensors(path)
  for k, v in arrays.items():
    assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape
    np.testing.assert_array_equal(loaded[k].view(np.uint8), v.view(np.uint8))
  with open(path, "r+b") as f:  # a truncated file is refused, not read short
    f.truncate(len(raw) - 4)
  with pytest.raises(ValueError, match="not a readable safetensors file"):
    wf.load_safetensors(path)


# ------------------------------------------------------------------ importing PyTorch checkpoints

def _as_torch(sd, prefix=""):
  return {prefix + k: torch.from_numpy(v.copy()) for k, v in sd.items()}


@needs_torch
def test_import_dino_full_training_checkpoint(tmp_path):
  """{'student', 'teacher', ...} with DDP/MultiCropWrapper prefixes, head keys and 'args'."""
  teacher, student, target = _vit(11), _vit(12), _vit(13)
  head = {"head.mlp.0.weight": torch.randn(32, 64), "head.last_layer.weight_g": torch.ones(16, 1)}
  checkpoint = {
      "student": {**_as_torch(tw.to_torch_state_dict(student, mask_token=False),
                              "module.backbone."),
                  **{"module." + k: v for k, v in head.items()}},
      "teacher": {**_as_torch(tw.to_torch_state_dict(teacher, mask_token=False), "backbone."),
                  **head},
      "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
      "epoch": 100, "args": argparse.Namespace(arch="vit_small", patch_size=8),
      "dino_loss": {"center": torch.zeros(1, 16)},
  }
  torch.save(checkpoint, tmp_path / "checkpoint.pth")
  mask_before = np.asarray(_params(target)["mask_token"])
  with pytest.warns(tw.MaskTokenNotLoaded, match="masked_embed"):
    tw.import_weights(str(tmp_path / "checkpoint.pth"), target)
  got, want = _params(target), _params(teacher)
  np.testing.assert_array_equal(got["mask_token"], mask_before)  # DINO has none: kept
  got.pop("mask_token"), want.pop("mask_token")
  _assert_bitwise_equal(got, want)


@needs_torch
@pytest.mark.parametrize("prefix", ["", "module.backbone.", "teacher.backbone."])
def test_import_ibot_style_flat_state_dict_with_masked_embed(prefix):
  source, target = _vit(21), _vit(22)
  sd = {**_as_torch(tw.to_torch_state_dict(source), prefix), prefix + "head.x": torch.ones(2)}
  with warnings.catch_warnings():
    warnings.simplefilter("error", tw.MaskTokenNotLoaded)
    tw.import_weights(sd, target)
  _assert_bitwise_equal(_params(target), _params(source))


def _broken(sd, case):
  sd = dict(sd)
  if case == "missing":
    del sd["blocks.1.mlp.fc2.bias"]
  elif case == "shape":
    sd["blocks.0.attn.qkv.weight"] = np.zeros((192, 32), np.float32)
  elif case == "unexpected":  # e.g. iBOT layer scale, which our ViT lacks
    sd["blocks.0.gamma_1"] = np.ones(64, np.float32)
  elif case == "image_size":
    sd["pos_embed"] = np.zeros((1, 1 + 36, 64), np.float32)
  elif case == "nested":
    sd = {"model": sd, "epoch": 3}
  return sd


@pytest.mark.parametrize("case,message", [
    ("missing", r"missing key blocks\.1\.mlp\.fc2\.bias"),
    ("shape", r"blocks\.0\.attn\.qkv\.weight: checkpoint \(192, 32\), model expects \(192, 64\)"),
    ("unexpected", r"unexpected key blocks\.0\.gamma_1"),
    ("image_size", r"pos_embed: checkpoint \(1, 37, 64\), model expects \(1, 17, 64\)"
                   r"(.|\n)*image_size"),
    ("nested", r"no 'teacher' entry(.|\n)*\['epoch', 'model'\](.|\n)*checkpoint_key"),
])
def test_import_errors_name_the_key(model, state_dict, case, message):
  with pytest.raises(ValueError, match=message):
    tw.from_torch_state_dict(_broken(state_dict, case), model)


class _NotATensor:
  """An arbitrary pickled object: weights_only loading must refuse it."""


@needs_torch
def test_pth_with_arbitrary_objects_needs_trust(tmp_path, state_dict):
  torch.save({"teacher": _as_torch(state_dict), "extra": _NotATensor()}, tmp_path / "x.pth")
  with pytest.raises(ValueError, match="trusted=True"):
    wf.load_pth(str(tmp_path / "x.pth"))
  loaded = wf.load_pth(str(tmp_path / "x.pth"), trusted=True)
  np.testing.assert_array_equal(loaded["teacher"]["norm.bias"], state_dict["norm.bias"])


# ------------------------------------------------------------------ workdir and command line

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A training workdir (config + Orbax checkpoints at steps 1 and 2) written with the
  trainer's own Checkpointer and state layout, without training: every leaf is random, filled
  from NumPy into the abstract train state (no init to compile); teacher != student."""
  from configs import smoke
  from sove_jax import checkpoint, optim, state as state_lib

  path = str(tmp_path_factory.mktemp("workdir"))
  config = smoke.get_config()
  checkpoint.write_config(config, path)
  tx = optim.make_optimizer(config, optim.make_schedules(config, 1, 1))
  abstract = jax.eval_shape(state_lib.make_init(config, tx, config.data.global_size),
                            jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  fill = lambda x: jnp.asarray(rng.standard_normal(x.shape) if jnp.issubdtype(
      x.dtype, jnp.floating) else np.zeros(x.shape), x.dtype)
  states = {}
  ckpt = checkpoint.Checkpointer(path, save_every=1, keep=2, asynchronous=False)
  for step in (1, 2):
    states[step] = jax.tree.map(fill, abstract)
    ckpt.save(step, states[step], {"epoch": 0})  # every save is written
  ckpt.close()
  return path, states


@needs_torch
def test_export_and_import_commands(workdir, tmp_path, capsys):
  path, states = workdir
  out = str(tmp_path / "teacher.safetensors")
  tw.export_command(workdir=path, out=out)  # latest step, teacher
  summary = json.loads(capsys.readouterr().out)
  assert summary["step"] == 2 and summary["which"] == "teacher"
  want = tw.to_torch_state_dict(states[2].teacher)
  got = wf.load_safetensors(out)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert wf.safetensors_metadata(out)["step"] == "2"

  pth = str(tmp_path / "student.pth")
  tw.export_command(workdir=path, out=pth, step=1, which="student")
  got = torch.load(pth, weights_only=True)
  want = tw.to_torch_state_dict(states[1].student)
  assert not np.array_equal(want["norm.weight"], tw.to_torch_state_dict(states[1].teacher)[
      "norm.weight"])
  for k in want:
    np.testing.assert_array_equal(got[k].numpy(), want[k], err_msg=k)

  capsys.readouterr()
  tiny = dict(variant="ti", width=32, depth=2, num_heads=2, patch_size=7, image_size=28)
  tw.import_command(checkpoint=out, **tiny)
  report = capsys.readouterr().out
  assert f"Loaded {len(want)} backbone tensors" in report and "finite=True" in report
  with pytest.raises(ValueError, match="missing key blocks.2"):
    tw.import_command(checkpoint=out, **{**tiny, "depth": 3})


@pytest.mark.slow
def test_weights_command_line_parses_absl_flags(workdir, tmp_path):
  """One real process: `export` then `import` with absl flags, and a usage error in one line."""
  import subprocess
  import sys
  path, _ = workdir
  out = str(tmp_path / "t.safetensors")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = lambda *args: subprocess.run([sys.executable, "-m", "sove_jax.interop.torch_weights",
                                      *args], capture_output=True, text=True, cwd=root,
                                     timeout=300)
  done = run("export", f"--workdir={path}", f"--out={out}", "--nomask_token")
  assert done.returncode == 0, done.stderr[-2000:]
  assert json.loads(done.stdout)["step"] == 2 and "masked_embed" not in wf.load_safetensors(out)
  done = run("import", f"--checkpoint={out}", "--variant=ti", "--width=32", "--depth=2",
             "--num_heads=2", "--patch_size=7", "--image_size=28")
  assert done.returncode == 0 and "Loaded 30 backbone tensors" in done.stdout, done.stderr
  done = run("convert", f"--checkpoint={out}")
  assert done.returncode == 1 and "Give one command, export or import" in done.stderr


# ------------------------------------------------------------------ released weights

ARCH = dict(patch_size=16, image_size=32, dtype=jnp.float32)  # DINO's vit_tiny, at 32 px


def _released_vit(seed):
  return _vit(seed, **ARCH, width=192, depth=12, num_heads=3)


def _head(prefix, hidden=48, dim=192, seed=0):
  """A projection head's tensors as DINO, iBOT and the authors store them (head.mlp.0 first)."""
  g = torch.Generator().manual_seed(seed)
  head = {"mlp.0.weight": torch.randn(hidden, dim, generator=g),
          "mlp.0.bias": torch.randn(hidden, generator=g),
          "mlp.2.weight": torch.randn(hidden, hidden, generator=g),
          "mlp.4.weight": torch.randn(8, hidden, generator=g)}
  return {f"{prefix}head.{k}": v for k, v in head.items()}


def _layouts(teacher, student):
  """file name -> (object torch.save writes, checkpoint_key, has the mask token, has a head):
  each official layout, made here (nothing can be downloaded)."""
  t = lambda m, prefix="", mask=True: _as_torch(tw.to_torch_state_dict(m, mask_token=mask),
                                                prefix)
  return {
      # DINO's released backbone (dino_deitsmall16_pretrain.pth): flat, no prefix, no head.
      "dino_backbone.pth": (t(teacher, mask=False), "teacher", False, False),
      # DINO's full checkpoint: teacher under MultiCropWrapper, student under DDP, with heads.
      "dino_full.pth": ({"teacher": {**t(teacher, "backbone.", mask=False), **_head("")},
                         "student": {**t(student, "module.backbone.", mask=False),
                                     **_head("module.", seed=1)},
                         "epoch": 100, "args": argparse.Namespace(arch="vit_tiny")},
                        "teacher", False, True),
      # iBOT's checkpoint_teacher.pth: {"state_dict": backbone with masked_embed}.
      "ibot_teacher.pth": ({"state_dict": t(teacher)}, "teacher", True, False),
      # iBOT's full checkpoint: a head with last_layer2 beside the backbone's masked_embed.
      "ibot_full.pth": ({"teacher": {**t(teacher, "backbone."), **_head(""),
                                     "head.last_layer2.weight_g": torch.ones(8, 1)},
                         "student": {**t(student, "module.backbone."), **_head("module.", seed=1)},
                         "ibot_loss": {"center": torch.zeros(1, 8)}}, "teacher", True, True),
      # The authors' SOVE checkpoint.pth: iBOTHead (mlp only) and the memory banks beside.
      "sop_full.pth": ({"teacher": {**t(teacher, "backbone."), **_head("")},
                        "student": {**t(student, "module.backbone."), **_head("module.", seed=1)},
                        "class_memory_bank": {"queue": torch.zeros(16, 8)},
                        "patch_memory_bank": {"queue": torch.zeros(16, 8)}, "epoch": 3},
                       "teacher", True, True),
      "sop_student.pth": ({"student": {**t(student, "module.backbone."),
                                       **_head("module.", seed=1)}, "teacher": {}},
                          "student", True, True),
  }


@needs_torch
def test_released_weights_load_in_every_official_layout(tmp_path):
  """DINO's, iBOT's and the authors' files, .pth and .safetensors: the backbone of the chosen
  entry bit for bit, the head's first layer where the file holds a head; then, for a flat and a
  nested file, the whole backbone with the patch and image size read from the tensors and the
  evaluation config of the paper's ImageNet runs."""
  teacher, student = _released_vit(31), _released_vit(32)
  want_tensors = {"teacher": tw.to_torch_state_dict(teacher),
                  "student": tw.to_torch_state_dict(student)}
  for name, (obj, key, mask, has_head) in _layouts(teacher, student).items():
    torch.save(obj, tmp_path / name)
    raw = wf.load_weights_file(str(tmp_path / name))
    tensors, ignored, _ = wf.select_backbone(raw, checkpoint_key=key)
    want = {k: v for k, v in want_tensors[key].items() if mask or k != tw.MASK_KEY}
    assert tensors.keys() == want.keys(), name
    for k in want:
      np.testing.assert_array_equal(tensors[k], want[k], err_msg=f"{name}: {k}")
    assert all(k.split("head.", 1)[0] in ("", "module.") for k in ignored), name
    layer = wf.select_head_layer(raw, checkpoint_key=key)
    if has_head:
      g = torch.Generator().manual_seed(1 if key == "student" else 0)
      np.testing.assert_array_equal(layer["kernel"], torch.randn(48, 192, generator=g).numpy().T)
      assert layer["bias"].shape == (48,)
    else:
      assert layer is None, name
  for name in ("dino_full.pth", "ibot_teacher.pth"):
    loaded = released.load_released(str(tmp_path / name), arch="vit_tiny")
    config, model = loaded
    got, want = _params(model), _params(teacher)
    if name.startswith("dino"):  # DINO trains no mask token
      got.pop("mask_token"), want.pop("mask_token")
    _assert_bitwise_equal(got, want)
    assert loaded.step is None and loaded.source == str(tmp_path / name)
    assert (config.model.variant, config.model.patch_size, config.data.global_size) == (
        "ti", 16, 32)
    assert model.pos_interpolation == "dino" and config.data.eval_crop == 32
    assert (loaded.head_layer is not None) == name.startswith("dino")
  # The same backbone from a .safetensors file (flat, as `export` writes it).
  wf.save_safetensors(tw.to_torch_state_dict(teacher), str(tmp_path / "t.safetensors"))
  tensors, _, _ = wf.select_backbone(wf.load_weights_file(str(tmp_path / "t.safetensors")))
  assert released.trained_sizes(tensors) == (16, 32)
  with pytest.raises(ValueError, match="--arch='swin_tiny' is not a released ViT"):
    released.load_released(str(tmp_path / "t.safetensors"), arch="swin_tiny")
  with pytest.raises(ValueError, match=r"width 192 and depth 12 \(vit_tiny\), not vit_small "
                                       r"\(width 384, depth 12\): pass --arch=vit_tiny\.$"):
    released.load_released(str(tmp_path / "t.safetensors"), arch="vit_small")


@needs_torch
def test_released_weights_are_evaluated_like_a_workdir(tmp_path):
  """`--weights=FILE --arch` through the spine: k-NN of the released teacher on made data, the
  record naming the file, the architecture and the entry, and no step; results beside the
  file in a folder named after it."""
  from sove_jax.evaluate import knn, protocol
  teacher = _released_vit(41)
  path = tmp_path / "dino_full.pth"
  torch.save(_layouts(teacher, _released_vit(42))["dino_full.pth"][0], path)
  source = protocol.Source(weights=str(path), arch="vit_tiny")
  source.check()
  assert source.out_dir() == str(tmp_path / "dino_full")
  rng = np.random.default_rng(0)
  split = lambda n: (rng.normal(size=(n, 32, 32, 3)).astype(np.float32), np.arange(n) % 3)
  data = {"train": split(24), "validation": split(8)}  # the ImageNet config's splits

  def input_fn(data_config, *, split, global_batch_size, max_examples=-1, **_):
    x, y = data[split]
    return [{"image": x, "label": y.astype(np.int32), "valid": np.ones(len(y), bool)}]

  protocol.run(knn.PROTOCOL, load=source.load, options=dict(input_fn=input_fn, ks=(1, 5),
                                                             batch_size=8),
               out_dir=source.out_dir(), source=source.describe())
  record = json.loads((tmp_path / "dino_full" / "knn.json").read_text())
  assert record["weights"] == str(path) and record["arch"] == "vit_tiny"
  assert record["checkpoint_key"] == "teacher" and record["step"] is None
  feats = np.asarray(teacher(data["train"][0])[:, 0], np.float64)
  feats /= np.linalg.norm(feats, axis=1, keepdims=True)
  test = np.asarray(teacher(data["validation"][0])[:, 0], np.float64)
  test /= np.linalg.norm(test, axis=1, keepdims=True)
  nearest = data["train"][1][np.argmax(test @ feats.T, axis=1)]
  assert record["top1"]["full"]["1"] == pytest.approx(100 * np.mean(nearest == data["validation"][1]))


def test_backbone_sources_fail_in_one_sentence(tmp_path):
  from sove_jax import configuration
  from sove_jax.evaluate import protocol
  cases = [(dict(), "--workdir=DIR"), (dict(workdir="w", weights="x.pth"), "not both"),
           (dict(weights="x.pth"), "--weights needs --arch"),
           (dict(weights="x.pth", arch="vit_small", step=3), "--step names a checkpoint")]
  for fields, words in cases:
    with pytest.raises(configuration.ConfigError, match=words):
      protocol.Source(**fields).check()
  with pytest.raises(FileNotFoundError, match="No weights file"):
    protocol.Source(weights=str(tmp_path / "none.pth"), arch="vit_small").check()


def test_package_imports_without_torch():
  """torch is optional: importing the module must not import it (checked in a fresh process)."""
  import subprocess
  import sys
  code = ("import sys; sys.modules['torch'] = None; "
          "import sove_jax.interop.torch_weights as t; print(t.MASK_KEY)")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=root)
  assert result.returncode == 0 and "masked_embed" in result.stdout, result.stderr


@needs_torch
@pytest.mark.slow
def test_weights_flags_of_an_evaluation_command(tmp_path):
  """One real process: `python -m sove_jax.evaluate.knn --weights=FILE --arch=vit_tiny` on an
  image folder; the record beside the file names the weights, and bad flags fail in one line."""
  import subprocess
  import sys

  from sove_jax.data import sources
  path = tmp_path / "dino_vittiny.pth"
  torch.save(_as_torch(tw.to_torch_state_dict(_released_vit(51), mask_token=False)), path)
  rng = np.random.default_rng(0)
  for split, n in (("train", 16), ("test", 8)):
    sources.write_image_folder(str(tmp_path / "data"), split,
                               rng.integers(0, 256, (n, 40, 40, 3)).astype(np.uint8),
                               np.arange(n) % 2)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = lambda *args: subprocess.run(
      [sys.executable, "-m", "sove_jax.evaluate.knn", *args], capture_output=True, text=True,
      cwd=root, timeout=600)
  done = run(f"--weights={path}", "--arch=vit_tiny", "--dataset=folder",
             f"--data_dir={tmp_path / 'data'}", "--train_split=train", "--eval_split=test",
             "--batch_size=8", "--ks=1,5", "--baselines=none")
  assert done.returncode == 0, done.stderr[-3000:]
  record = json.loads((tmp_path / "dino_vittiny" / "knn.json").read_text())
  assert record["weights"] == str(path) and record["step"] is None
  assert set(record["top1"]["full"]) == {"1", "5"}
  done = run(f"--weights={path}", "--dataset=folder")
  errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
  assert done.returncode == 1 and len(errors) == 1 and "--weights needs --arch" in errors[0]
