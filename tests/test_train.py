"""The training system on the smoke config: sharding, resume, kill, SIGTERM, NaN, bad configs.

Runs that must be separate processes (resume in a new process, SIGKILL, SIGTERM, main end to
end) go through `python -m sove_jax.main`; they inherit the 8 fake CPU devices of the session.
"""
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from sove_jax import checkpoint, configuration, optim, sharding, state as state_lib, train
from sove_jax import step as step_lib
from sove_jax import masks, views
from batches import synthetic_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STEP_LINE = re.compile(r"\bstep +\d+/\d+ \| loss")  # the console's progress line


def _main(workdir, *overrides, config="configs/smoke.py", **kw):
  cmd = [sys.executable, "-m", "sove_jax.main", f"--config={config}", f"--workdir={workdir}",
         *overrides]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **kw)


def _run(workdir, *overrides, timeout=300):
  proc = _main(workdir, *overrides)
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def _restore(workdir, step=None):
  """The whole saved state of a smoke run, as host numpy arrays."""
  config = checkpoint.read_config(str(workdir))
  mesh = sharding.make_mesh(config.mesh)
  setup = train.build(config, mesh, steps_per_epoch=1)
  ck = checkpoint.Checkpointer(str(workdir), save_every=1, keep=10)
  got = ck.restore(state_lib.abstract_with_shardings(setup.layout), step=step)
  ck.close()
  return jax.device_get(got[0]), got[1]


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  differ = [jax.tree_util.keystr(path) for (path, x), (_, y) in
            zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b))
            if not np.array_equal(np.asarray(x), np.asarray(y))]
  assert not differ, f"{len(differ)} leaves differ, e.g. {differ[:8]}"


def _traced_once(*args, **kwargs):
  """The train step, refusing to be traced a second time (a retrace is a recompilation)."""
  return chex.assert_max_traces(step_lib.make_train_step(*args, **kwargs), n=1)


def _steps(config, devices, num_steps=3):
  chex.clear_trace_counter()  # chex counts by source location: each setup starts at 0
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  setup = train.build(config, mesh, steps_per_epoch=10, make_step=_traced_once)
  st = state_lib.create(config, setup.tx, setup.layout, setup.image_size)
  batch_sh = sharding.batch_sharding(mesh)
  metrics = None
  for i in range(num_steps):
    batch = jax.device_put(synthetic_batch(config, seed=i), batch_sh)
    st, metrics = setup.step(st, batch)
  return jax.device_get(st), jax.device_get(metrics)


@pytest.mark.slow
def test_sharded_step_equals_single_device_step_and_compiles_once():
  """Three steps on one device and on eight agree; each setup traces its step once only
  (chex.assert_max_traces), so the donated state's types stay fixed from step to step.

  The attention's key bias is left out: adding a constant to every key leaves each softmax
  unchanged, so its exact gradient is 0 and the computed one is rounding noise, which Adam
  turns into updates of about the learning rate with the noise's sign (with the default's KoLeo
  term the noise exceeds Adam's epsilon). Query and value biases are compared."""
  config = smoke.get_config()
  config.model.dtype = "float32"  # compare the sharding, not bf16 rounding differences
  assert config.sove.koleo_weight > 0   # the default's objective, KoLeo included
  one, m1 = _steps(config, jax.devices()[:1])
  eight, m8 = _steps(config, jax.devices())
  assert len(jax.devices()) == 8
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-4)
  compared = 0
  for name in ("student", "teacher", "opt_state", "class_bank", "patch_bank"):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(getattr(one, name)),
                            jax.tree.leaves(getattr(eight, name))):
      x, y = np.asarray(x), np.asarray(y)
      if "['qkv']['bias']" in jax.tree_util.keystr(path) and x.ndim >= 1:
        x, y = np.delete(x, 1, axis=0), np.delete(y, 1, axis=0)   # [q, k, v] -> [q, v]
        compared += 1
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  assert compared >= 2 * config.model.depth, compared   # the qkv biases were found
  assert int(one.step) == int(eight.step) == 3
  assert m1["finite"] and np.isfinite(m1["grad_norm"])
  assert 0.0 <= m1["agreement"] <= 1.0


@pytest.mark.slow
def test_fsdp_shards_parameters():
  config = smoke.get_config()
  config.mesh.fsdp, config.mesh.shard_params = 4, True
  mesh = sharding.make_mesh(config.mesh)
  setup = train.build(config, mesh, steps_per_epoch=10)
  specs = [s.spec for s in jax.tree.leaves(setup.layout.shardings.student)]
  assert any("fsdp" in tuple(s) for s in specs)
  st = state_lib.create(config, setup.tx, setup.layout, setup.image_size)
  batch = jax.device_put(synthetic_batch(config), sharding.batch_sharding(mesh))
  st, metrics = setup.step(st, batch)
  assert bool(metrics["finite"])


def test_fsdp_logs_each_parameter_layout_and_refuses_replicated_parameters(caplog):
  """Rules come from config.mesh.rules; every layout is logged (blocks grouped); a rule set
  that leaves most bytes whole on every device, or names no parameter's axis, is refused."""
  config = smoke.get_config()
  config.mesh.fsdp, config.mesh.shard_params = 4, True
  mesh = sharding.make_mesh(config.mesh)
  tx = optim.make_optimizer(config, optim.make_schedules(config, 10, 10))
  layout = lambda: state_lib.layout(config, tx, mesh, config.data.global_size)
  with caplog.at_level(logging.INFO):
    layout()
  assert re.search(r"backbone\.blocks\.\*\.attn\.qkv\.kernel +x2 +\(32, 3, 2, 16\) +"
                   r"P\('fsdp', None, None, None\)", caplog.text), caplog.text
  assert re.search(r"head\.fc3\.bias +\(32,\) +P\(None,\)", caplog.text)
  config.mesh.rules = (("mlp", "fsdp"),)
  with pytest.raises(configuration.ConfigError, match=r"mesh.fsdp=4, 57\.5% of the parameter "
                     "bytes stay replicated, more than mesh.max_replicated=0.02"):
    layout()
  config.mesh.rules = (("embedding", "fsdp"),)
  with pytest.raises(configuration.ConfigError, match="'embedding', which no parameter carries"):
    layout()


@pytest.mark.parametrize("field,value,words", [
    ("batch_size", 12, "multiple of the 8 devices"),
    ("data.global_size", 30, "multiple of model.patch_size"),
    ("sove.num_anchors", 100_000, "more anchors than the bank"),
    ("model.variant", "xl", "model.variant"),
    ("sove.num_neighbors", 250, "non-anchor rows"),
])
def test_bad_config_raises_one_sentence(field, value, words):
  config = smoke.get_config()
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(configuration.ConfigError, match=words):
    configuration.validate(config, num_devices=8)


def test_main_rejects_bad_config_before_compiling(tmp_path):
  t0 = time.time()
  code, out = _run(tmp_path / "w", "--config.sove.num_anchors=100000")
  assert code != 0
  assert "Config error: sove.num_anchors=100000" in out
  assert "Traceback" not in out
  assert not (tmp_path / "w" / "checkpoints").exists()
  assert time.time() - t0 < 60


@pytest.mark.slow
def test_resume_in_new_process_is_bitwise_exact(tmp_path):
  straight, split = tmp_path / "straight", tmp_path / "split"
  config = smoke.get_config()
  config.total_steps = 6
  train.train_and_evaluate(config, str(straight))  # in process: the reference state
  code, out = _run(split, "--config.total_steps=6", "--config.run_steps=3")
  assert code == 0, out
  assert "new run" in out
  # The console is quiet by default: our lines, not Orbax's INFO detail; --verbose shows it.
  assert "Saving checkpoint" not in out and "checkpoint_manager" not in out
  code, out = _run(split, "--config.total_steps=6", "--verbose")
  assert code == 0, out
  assert "resumed from step 3" in out
  assert "checkpoint_manager.py" in out and "Saving checkpoint" in out
  a, data_a = _restore(straight, 6)
  b, data_b = _restore(split, 6)
  _assert_trees_equal(a, b)
  assert data_a == data_b


@pytest.mark.slow
def test_device_augmentation_trains_and_resumes_bitwise_exact(tmp_path):
  """data.augment = "device": Fashion-MNIST lives on the devices, the step cuts the views from
  the state's key and draws the masks; a run stopped after 2 steps and resumed from its
  checkpoint ends in the straight run's state. In process (the restart in a new process is
  test_resume_in_new_process_is_bitwise_exact's, and the rehearsal's on 4 processes)."""
  config = smoke.get_config()
  config.data.augment = "device"
  straight, split = tmp_path / "straight", tmp_path / "split"
  train.train_and_evaluate(config, str(straight))
  first = config.copy_and_resolve_references()
  first.run_steps = 2
  train.train_and_evaluate(first, str(split))
  assert checkpoint.checkpoint_steps(split)[-1] == 2
  train.train_and_evaluate(config, str(split))
  a, data_a = _restore(straight, 4)
  b, data_b = _restore(split, 4)
  _assert_trees_equal(a, b)
  assert data_a == data_b == {"process_count": 1, "processes": [{"epoch": 0, "position": 64}]}


@pytest.mark.slow
def test_device_mode_step_cuts_the_views_and_draws_the_masks_from_the_state_key():
  """The device-mode step on Fashion-MNIST indices is the host-mode step on the views that
  `views.make` cuts from the same images, and the masks `masks.draw` draws, with keys folded off
  the state's; other views or other masks, other results. (The same setups as the resume tests'
  and the sharded step test's: their compiled steps are reused from the session's compilation
  cache.)"""
  from sove_jax.data import sources
  config = smoke.get_config()
  # Wide crops, so that other views give clearly other losses (the default's are mild).
  config.data.global_scale, config.data.local_scale = (0.25, 1.0), (0.05, 0.4)
  mesh = sharding.make_mesh(config.mesh)
  images = sources.fashion_mnist("train").images
  resident = {"images": jax.device_put(images, sharding.replicated(mesh))}
  config.data.augment = "device"
  on_device = train.build(config, mesh, steps_per_epoch=60000 // 16, resident=resident)
  config.data.augment = "host"
  on_host = train.build(config, mesh, steps_per_epoch=10)
  assert set(on_device.batch) == {"images", "index", "label"}  # the step draws the masks
  assert set(on_host.batch) == {"global", "local", "mask", "label"}
  state = lambda: state_lib.create(config, on_host.tx, on_host.layout, on_host.image_size)
  key = jax.device_get(state().key)
  rng = np.random.default_rng(0)
  index = rng.choice(len(images), 16, replace=False).astype(np.int32)
  label = {"label": np.zeros(16, np.int32)}
  batch_sh = sharding.batch_sharding(mesh)
  put = lambda batch: jax.device_put(batch, batch_sh)
  recipe = views.Recipe.from_config(config.data)
  mask_recipe = step_lib.masks_for(config)
  assert mask_recipe.grid == (4, 4)  # 28 px crops, patch 7
  sizes = np.full((16, 2), 28, np.int32)
  make = jax.jit(views.make, static_argnums=3)
  made = lambda stream: make(images[index], sizes, jax.random.fold_in(key, stream), recipe)
  draw = jax.jit(masks.draw, static_argnums=(1, 2))
  drawn = lambda stream: {"mask": draw(jax.random.fold_in(key, stream), (16, 2), mask_recipe)}
  _, got = on_device.step(state(), put({**label, "index": index}) | resident)
  our_views, our_masks = made(step_lib.VIEWS_STREAM), drawn(step_lib.MASKS_STREAM)
  _, want = on_host.step(state(), put({**label, **our_views, **our_masks}))
  _, other_views = on_host.step(state(), put({**label, **made(step_lib.VIEWS_STREAM + 1),
                                              **our_masks}))
  _, other_masks = on_host.step(state(), put({**label, **our_views,
                                              **drawn(step_lib.MASKS_STREAM + 1)}))
  got, want, other_views, other_masks = jax.device_get((got, want, other_views, other_masks))
  for name in ("loss", "cls_loss", "patch_loss", "grad_norm"):
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)
    assert abs(other_views[name] - want[name]) > 1e-3 * abs(want[name]), name
  assert abs(other_masks["patch_loss"] - want["patch_loss"]) > 1e-3 * abs(want["patch_loss"])
  # Canvases and sizes (decoded sources) take the same path through views.make and masks.draw;
  # masks given in the batch are kept.
  canvases = np.zeros((16, 32, 32, 1), np.uint8)
  canvases[:, :28, :28] = images[index]
  cut = jax.jit(step_lib.device_views, static_argnums=(2, 3))(
      {"canvas": canvases, "size": sizes, **label}, key, recipe, mask_recipe)
  assert set(cut) == {"global", "local", "mask", "label"}
  for name in ("global", "local"):
    np.testing.assert_allclose(np.asarray(cut[name]), np.asarray(our_views[name]), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(cut["mask"]), np.asarray(our_masks["mask"]))
  given = {"canvas": canvases, "size": sizes, **label, "mask": np.zeros((16, 2, 16), bool)}
  kept = jax.jit(step_lib.device_views, static_argnums=(2, 3))(given, key, recipe, mask_recipe)
  assert not np.asarray(kept["mask"]).any()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_at_step_boundary_and_exits_zero(tmp_path, signum):
  """SIGTERM (preemption) or a first Ctrl-C: the step in progress ends, is saved, exit 0."""
  proc = _main(tmp_path, "--config.total_steps=100000", "--config.checkpoint_every=100000")
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if _STEP_LINE.search(line):
      proc.send_signal(signum)
      break
  out, _ = proc.communicate(timeout=120)
  out = "".join(lines) + out
  assert proc.returncode == 0, out
  name = signal.Signals(signum).name
  saved_step = int(re.search(rf"stopped \({name}\): saved step (\d+)", out).group(1))
  ck = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=10)
  assert ck.latest_step() == saved_step
  ck.close()


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once_without_saving(tmp_path):
  proc = _main(tmp_path, "--config.total_steps=100000", "--config.checkpoint_every=100000",
               "--config.log_every=100000")
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if "new run:" in line:  # before the first step: no step can be saved
      proc.send_signal(signal.SIGINT)
    if "SIGINT received" in line:
      proc.send_signal(signal.SIGINT)
      break
  out, _ = proc.communicate(timeout=120)
  out = "".join(lines) + out
  assert proc.returncode == 130, out
  assert "second SIGINT: aborted without saving" in out and "Traceback" not in out
  assert checkpoint.checkpoint_steps(str(tmp_path)) == []


@pytest.mark.slow
def test_main_end_to_end_on_image_folder(tmp_path):
  """A tiny JPEG/PNG folder dataset, its views cut on the device from 32 x 32 canvases (the
  40 x 36 images downscaled to fit): train, checkpoint, metrics and TensorBoard files."""
  tf = pytest.importorskip("tensorflow")
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for cls in ("cat", "dog"):
      os.makedirs(tmp_path / "data" / split / cls)
      for i in range(12):
        img = rng.integers(0, 255, size=(40, 36, 3), dtype=np.uint8)
        enc = tf.io.encode_png(img) if i % 2 else tf.io.encode_jpeg(img)
        (tmp_path / "data" / split / cls / f"{i}.{'png' if i % 2 else 'jpg'}").write_bytes(
            enc.numpy())
  (tmp_path / "data" / "train" / "cat" / "broken.jpg").write_bytes(b"not an image")
  work = tmp_path / "work"
  code, out = _run(work, "--config.data.source=folder",
                   f"--config.data.data_dir={tmp_path / 'data'}", "--config.data.augment=device",
                   "--config.data.canvas_size=32", "--config.data.minival_examples=4",
                   "--config.total_steps=3", "--config.checkpoint_every=2", "--config.knn_every=3",
                   "--config.knn_train_examples=-1", "--config.knn_eval_examples=-1",
                   "--config.profile=True")
  assert code == 0, out
  assert "step 3/3" in out and "img/s" in out and "k-NN top-1 at step 3" in out
  # The undecodable file is named at most once (training; if its epoch order reached it) and
  # counted by the monitor's pass over the split, in one line each; TensorFlow's own report of
  # the decode error (about ten lines a file) stays off the console.
  assert len([line for line in out.splitlines() if "broken.jpg" in line]) <= 1, out
  assert "skipped 1 example(s) that did not decode" in out
  assert "DecodeImage" not in out and "ignore_errors" not in out
  rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
  assert [row["step"] for row in rows] == [1, 2, 3]  # log_every=1: one line per step
  # Throughput from the second logged step on: the first step (compilation) starts the clock.
  assert not any(k.startswith("perf/") for k in rows[0])
  assert rows[2]["perf/images_per_sec"] == pytest.approx(16 * rows[2]["perf/steps_per_sec"])
  assert 0.0 <= rows[2]["knn/top1_k20"] <= 100.0 and np.isfinite(rows[2]["train/loss"])
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(work))
  assert list((work / "plugins" / "profile").glob("*/*.xplane.pb"))  # config.profile
  # The k-NN command on the trained run, on one device where it trained on eight, without the
  # random-initialization baseline (as the study and the search ask for it).
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run([sys.executable, "-m", "sove_jax.evaluate.knn", f"--workdir={work}",
                           "--batch_size=8", "--baselines=none"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "k-NN top-1 (%)" in result.stderr and "Traceback" not in result.stderr
  assert "trained" in result.stderr and "random init" not in result.stderr
  record = json.loads((work / "knn.json").read_text())
  assert record["step"] == 3  # the checkpoint evaluated, not "latest"
  assert 0.0 <= record["top1"]["full"]["20"] <= 100.0
  ck = checkpoint.Checkpointer(str(work), save_every=1, keep=10)
  assert ck.latest_step() == 3
  ck.close()


def test_compile_only_prints_memory(tmp_path):
  code, out = _run(tmp_path, "--compile_only")
  assert code == 0, out
  assert "per device temp_size" in out and "GiB" in out


def test_itstime_is_every_cadence_of_the_loop():
  """Logging, the monitor and checkpoints: every N steps and at the last step; 0 is never."""
  assert [s for s in range(1, 11) if train.itstime(s, 4, last=10)] == [4, 8, 10]
  assert [s for s in range(1, 11) if train.itstime(s, 0, last=10)] == [10]
  assert [s for s in range(1, 11) if train.itstime(s, 3)] == [3, 6, 9]


def test_distributed_initialization_uses_the_flags_or_jax_cluster_detection(monkeypatch):
  """Explicit flags start that job; without them JAX's own detection decides (SLURM, TPU pods,
  Open MPI, Kubernetes), and finding no cluster means one process. A cluster that was found but
  cannot be joined is an error, not a silent single-process run."""
  from absl import flags
  from absl.testing import flagsaver

  from sove_jax import main
  calls = []

  timeouts = dict(heartbeat_timeout_seconds=300, shutdown_timeout_seconds=60)

  def initialize(**kwargs):
    calls.append(kwargs)
    if kwargs == timeouts:  # what jax.distributed.initialize() says where it detects no cluster
      raise ValueError("coordinator_address should be defined.")

  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  monkeypatch.setenv("JAX_PLATFORMS", "")  # not the CPU-only gloo set-up in this process
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  hosts_config = smoke.get_config().hosts  # the config's hosts block sets JAX's timeouts
  main._initialize_distributed(hosts_config)
  assert calls == [timeouts]
  with flagsaver.flagsaver(coordinator_address="host:1234", num_processes=2, process_id=1):
    main._initialize_distributed(hosts_config)
  assert calls[-1] == dict(coordinator_address="host:1234", num_processes=2, process_id=1,
                           **timeouts)

  def unreachable(**kwargs):
    raise ValueError("Number of processes must be defined.")

  monkeypatch.setattr(jax.distributed, "initialize", unreachable)
  with pytest.raises(ValueError, match="Number of processes"):
    main._initialize_distributed(hosts_config)


@pytest.mark.slow
def test_keep_period_keeps_every_nth_checkpoint_for_good(tmp_path):
  config = smoke.get_config()
  config.total_steps, config.checkpoint_every = 7, 1
  config.keep_checkpoints, config.keep_period = 2, 3
  train.train_and_evaluate(config, str(tmp_path))
  # The last two, and every multiple of 3 before them.
  assert checkpoint.checkpoint_steps(str(tmp_path)) == [3, 6, 7]
  config.keep_period = 2  # any period is a multiple of a checkpoint every step
  configuration.validate_run_control(config)
  config.checkpoint_every, config.keep_period = 4, 6
  with pytest.raises(configuration.ConfigError, match="keep_period=6 must be a multiple"):
    configuration.validate_run_control(config)


def test_the_device_step_masks_no_crop_before_the_masks_start_epoch():
  """data.mask_start_epoch in device mode: the step counts epochs by the schedules'
  steps_per_epoch; before the start every mask is empty, from it on the masks are those drawn
  without a start."""
  config = smoke.get_config()
  config.data.update(augment="device", mask_start_epoch=1)
  config.data.num_local = 0
  schedules = optim.make_schedules(config, steps_per_epoch=10, total_steps=30)
  assert schedules.steps_per_epoch == 10
  recipe, mask_recipe = views.Recipe.from_config(config.data), step_lib.masks_for(config)
  images = np.random.default_rng(0).integers(0, 255, (32, 28, 28, 1), np.uint8)
  batch = {"index": np.arange(16, dtype=np.int32), "images": images,
           "label": np.zeros(16, np.int32)}
  key = jax.random.PRNGKey(3)
  cut = jax.jit(step_lib.device_views, static_argnums=(2, 3))
  before = cut(batch, key, recipe, mask_recipe, None, jnp.int32(9 // 10))  # step 9: epoch 0
  after = cut(batch, key, recipe, mask_recipe, None, jnp.int32(10 // 10))  # step 10: epoch 1
  unstarted = cut(batch, key, recipe, dataclasses.replace(mask_recipe, start_epoch=0))
  assert not np.asarray(before["mask"]).any()
  assert np.asarray(after["mask"]).any()
  np.testing.assert_array_equal(np.asarray(after["mask"]), np.asarray(unstarted["mask"]))
