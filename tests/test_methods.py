"""The methods and the ablation switches, on the smoke config.

DINO and iBOT share SOVE's step: on one device and on eight (the prototype layer FSDP-sharded)
they agree and trace once; their prototype layer stays still while frozen and trains after;
their centers follow the EMA of the teacher's mean logits; the student learns the (held) teacher.
Each ablation switch does what it says: a zero-weight loss is not computed at all (its inputs
may be NaN), the judges take the shapes their fields give, the mean patch token feeds the
class bank and the k-NN features. The losses themselves are checked against float64 references
in test_objective.py and test_prototypes.py.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default, smoke
from sove_jax import configuration, optim, sharding, state as state_lib, train
from sove_jax import step as step_lib
from sove_jax.evaluate import features, knn
from batches import synthetic_batch


def _config(method="sove", **fields):
  """The smoke config in float32 with `method`; `fields` as {"section.name": value}."""
  config = smoke.get_config()
  config.method = method
  config.model.dtype = "float32"
  config.baseline.num_prototypes = 64
  for name, value in fields.items():
    section, _, leaf = name.rpartition(".")
    (config[section] if section else config)[leaf] = value
  configuration.validate(config, num_devices=8)
  return config


def _setup(config, devices, make_step=step_lib.make_train_step):
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  setup = train.build(config, mesh, steps_per_epoch=10, make_step=make_step)
  st = state_lib.create(config, setup.tx, setup.layout, setup.image_size)
  return setup, st, sharding.batch_sharding(mesh)


def _traced_once(*args, **kwargs):
  return chex.assert_max_traces(step_lib.make_train_step(*args, **kwargs), n=1)


def _last_layer(params):
  return params["head"]["last_layer"]


def _assert_adam_close(a, b, *, lr, steps, rtol=2e-4, atol=2e-5):
  """Two parameter trees after `steps` Adam steps of at most `lr` agree, but for a few
  elements whose gradient is zero in exact arithmetic (the key bias: softmax ignores it) or
  nearly so: Adam divides such a gradient by its own magnitude, so rounding noise, which
  differs with the sharding, moves them by up to `lr` per step either way."""
  x = np.concatenate([np.ravel(v) for v in jax.tree.leaves(a)])
  y = np.concatenate([np.ravel(v) for v in jax.tree.leaves(b)])
  far = ~np.isclose(x, y, rtol=rtol, atol=atol)
  assert far.mean() <= 0.005, f"{far.sum()} of {far.size} parameters differ"
  np.testing.assert_array_less(np.abs(x - y)[far], 2 * lr * steps)


# ------------------------------------------------------------------------- DINO and iBOT


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dino", "ibot"])
def test_baseline_steps(method):
  """Four steps of one batch, the teacher held (EMA momentum 1) so its targets stay put: on one
  device and on eight with the prototypes sharded over fsdp=2 the states agree and the step is
  traced once; the prototype layer is frozen for 2 steps (0.2 epochs of 10 steps), then trains;
  each center is (1 - 0.9^n) times the teacher's mean logits after n steps; the loss falls."""
  config = _config(method, **{
      "optim.ema_momentum": 1.0, "optim.ema_momentum_end": 1.0,
      "optim.base_lr": 0.05, "baseline.freeze_last_layer_epochs": 0.2,
      "baseline.teacher_temp_warmup_epochs": 0.0, "baseline.norm_last_layer": method == "dino"})
  batch = synthetic_batch(config)
  runs = {}
  for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
    config.mesh.fsdp, config.mesh.shard_params = (1, False) if name == "one" else (2, True)
    chex.clear_trace_counter()
    setup, st, batch_sh = _setup(config, devices, make_step=_traced_once)
    start = jax.device_get(st)
    states, losses = [], []
    for _ in range(4):
      st, metrics = setup.step(st, jax.device_put(batch, batch_sh))
      states.append(jax.device_get(st))
      losses.append(float(metrics["loss"]))
      assert bool(metrics["finite"])
    runs[name] = (setup, start, states, losses, jax.device_get(metrics))
  setup8 = runs["eight"][0]
  kernel_spec = _last_layer(setup8.layout.shardings.student)["kernel"].spec
  assert tuple(kernel_spec) == (None, "fsdp"), kernel_spec  # [bottleneck, prototypes]

  setup, start, states, losses, metrics = runs["one"]
  eight = runs["eight"][2][-1]
  np.testing.assert_allclose(losses, runs["eight"][3], rtol=1e-4)
  peak_lr = config.optim.base_lr * config.batch_size / 256
  _assert_adam_close(states[-1].student, eight.student, lr=peak_lr, steps=len(states))
  for name in states[-1].centers:
    np.testing.assert_allclose(states[-1].centers[name], eight.centers[name], rtol=1e-4,
                               atol=1e-6)

  assert setup.schedules.frozen_last_layer_steps == 2
  for i, st in enumerate(states):
    still = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(_last_layer(start.student)),
                                                   jax.tree.leaves(_last_layer(st.student)))]
    assert all(still) if i < 2 else not any(still), f"after step {i + 1}: {still}"
  if method == "ibot":  # the trained prototype norm is a parameter of the last layer too
    assert "scale" in _last_layer(start.student)
  fc1 = lambda st: st.student["head"]["mlp"]["fc1"]["kernel"]
  assert not np.array_equal(fc1(start), fc1(states[0]))  # the rest trains from step 1
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(start.teacher),
                                                   jax.tree.leaves(states[-1].teacher)))

  teacher = nnx.merge(setup.layout.graphdef, start.teacher)
  cls_logits, patch_logits = teacher(step_lib.image_major(jnp.asarray(batch["global"])))
  want = {"cls": np.mean(np.asarray(cls_logits, np.float64), axis=0)}
  if method == "ibot":
    want["patch"] = np.mean(np.asarray(patch_logits, np.float64), axis=(0, 1))
  assert set(states[-1].centers) == set(want)
  for name, mean in want.items():
    np.testing.assert_allclose(states[-1].centers[name], (1 - 0.9 ** 4) * mean, rtol=1e-4,
                               atol=1e-6)

  # The student learns the held teacher's targets (after the first step, which centered them).
  assert losses[1] > losses[2] > losses[3], losses
  assert 0.0 <= metrics["agreement"] <= 1.0
  log_k = np.log(config.baseline.num_prototypes)
  for prefix in ("teacher",) + (("teacher_patch",) if method == "ibot" else ()):
    assert 0.0 <= metrics[f"{prefix}_entropy"] <= metrics[f"{prefix}_entropy_of_mean"] <= log_k
  assert ("patch_loss" in metrics) == (method == "ibot")
  assert ("teacher_patch_temp" in metrics) == (method == "ibot")


def test_states_hold_banks_for_sove_and_centers_for_the_baselines():
  """SOVE's state (so its checkpoints) keeps its fields; DINO's and iBOT's hold centers."""
  fields = {}
  for method in ("sove", "dino", "ibot"):
    config = _config(method)
    tx = optim.make_optimizer(config, optim.make_schedules(config, 10, 10))
    abstract = jax.eval_shape(state_lib.make_init(config, tx, 28), jax.random.PRNGKey(0))
    fields[method] = abstract
  assert type(fields["sove"]) is state_lib.TrainState
  assert list(fields["sove"].__dataclass_fields__) == [
      "step", "student", "teacher", "opt_state", "class_bank", "patch_bank", "key"]
  assert "last_layer" not in str(jax.tree_util.tree_structure(fields["sove"].student))
  for method, centers in (("dino", {"cls"}), ("ibot", {"cls", "patch"})):
    st = fields[method]
    assert type(st) is state_lib.PrototypeTrainState
    assert set(st.centers) == centers
    assert all(c.shape == (64,) for c in st.centers.values())
    assert _last_layer(st.student)["kernel"].shape == (32, 64)  # head_out -> prototypes


# ------------------------------------------------------------------------- ablation switches


def _poisoned(batch, state, *, local=False, class_bank=False, patch_bank=False):
  batch = dict(batch)
  if local:
    batch["local"] = np.full_like(batch["local"], np.nan)
  nan_bank = lambda bank: bank.replace(embeddings=jnp.full_like(bank.embeddings, jnp.nan))
  return batch, state.replace(
      class_bank=nan_bank(state.class_bank) if class_bank else state.class_bank,
      patch_bank=nan_bank(state.patch_bank) if patch_bank else state.patch_bank)


@pytest.mark.slow
def test_a_zero_weight_loss_is_not_computed():
  """NaN inputs of a loss reach the full step's loss; with that loss's weight at 0 they reach
  nothing: MIM only runs no local crops and no class judges, [CLS] only no patch judges and no
  patch-bank refill. Each costs fewer FLOPs than the full step. (The default's KoLeo term is
  off here, so that each run's loss is its SOVE losses; its own weight 0 is tests/test_koleo.py's.)"""
  flops, results = {}, {}
  for name, weights in (("full", {}), ("mim_only", {"sove.class_weight": 0.0}),
                        ("cls_only", {"sove.patch_weight": 0.0})):
    config = _config(**{"sove.koleo_weight": 0.0, **weights})
    setup, st, batch_sh = _setup(config, jax.devices()[:1])
    compiled = setup.step.lower(state_lib.abstract_with_shardings(setup.layout),
                                train.batch_shapes(config, sharding.make_mesh(
                                    config.mesh, devices=jax.devices()[:1]))).compile()
    flops[name] = compiled.cost_analysis()["flops"]
    results[name] = (compiled, st, synthetic_batch(config))
  assert flops["mim_only"] < flops["full"] and flops["cls_only"] < flops["full"], flops

  def run(name, **poison):
    compiled, st, batch = results[name]
    batch, st = _poisoned(batch, jax.tree.map(jnp.copy, st), **poison)  # the step donates it
    old = jax.device_get(st)
    new, metrics = compiled(st, batch)
    return old, jax.device_get(new), jax.device_get(metrics)

  for poison in ({"local": True}, {"class_bank": True}, {"patch_bank": True}):
    assert not run("full", **poison)[2]["finite"], poison
  _, _, metrics = run("mim_only", local=True, class_bank=True)
  assert metrics["finite"] and "cls_loss" not in metrics and "agreement" not in metrics
  assert metrics["loss"] == metrics["patch_loss"]
  old, new, metrics = run("cls_only", patch_bank=True)
  assert metrics["finite"] and "patch_loss" not in metrics
  assert metrics["loss"] == metrics["cls_loss"]
  assert np.isnan(new.patch_bank.embeddings).all()  # left as it was, not refilled
  assert int(new.patch_bank.ptr) == int(old.patch_bank.ptr)


def test_judge_switches_shape_the_judges():
  """Judges per concept (J = k + 1), anchors kept, tasks per loss and soft or one-hot labels
  for the [CLS] and the MIM loss, as the step draws them."""
  config = _config(**{"sove.num_neighbors": 2, "sove.patch_neighbors": 1, "sove.num_anchors": 16,
                      "sove.anchor_keep": 0.5, "sove.class_tasks": 3, "sove.patch_tasks": 2,
                      "sove.patch_anchors": 8})
  tx = optim.make_optimizer(config, optim.make_schedules(config, 10, 10))
  st = state_lib.make_init(config, tx, 28)(jax.random.PRNGKey(0))
  teacher_cls = jnp.zeros((2, 4, 32))
  teacher_patches = jnp.zeros((2, 4, 16, 32))

  def judges(labels):
    config.sove.labels = labels
    parts = step_lib.SoveParts(config, optim.make_schedules(config, 10, 10), None)
    (cls_tasks, patch_tasks), _ = parts.targets(st, teacher_cls, teacher_patches,
                                                jax.random.PRNGKey(1), jax.random.PRNGKey(2), 0)
    return [j for j, _ in cls_tasks], [j for j, _ in patch_tasks]

  cls_judges, patch_judges = judges("soft")
  assert len(cls_judges) == 3 and len(patch_judges) == 2
  assert all(j.vectors.shape == (8, 3, 32) for j in cls_judges)  # 16 anchors, half kept
  assert all(j.vectors.shape == (8, 2, 32) for j in patch_judges)
  assert not np.allclose(cls_judges[0].weights[:, 1:], 0.9)  # similarity-weighted neighbors
  cls_onehot, patch_onehot = judges("onehot")
  for j in cls_onehot + patch_onehot:
    np.testing.assert_allclose(j.weights, 0.9)  # every judge 1 - smoothing
  np.testing.assert_array_equal(cls_onehot[0].vectors, cls_judges[0].vectors)


@pytest.mark.slow
def test_mean_patch_representation_feeds_the_class_bank_and_the_knn_features():
  """With model.global_pool="mean_patch" the class bank takes the teacher head's embedding of
  the mean patch token of view 2; the [CLS] loss compares those embeddings (the step's
  agreement is over them) and k-NN evaluation reads the backbone's mean patch token."""
  config = _config(**{"model.global_pool": "mean_patch"})
  setup, st, batch_sh = _setup(config, jax.devices()[:1])
  start = jax.device_get(st)
  batch = synthetic_batch(config)
  new, metrics = setup.step(st, jax.device_put(batch, batch_sh))
  assert bool(metrics["finite"])
  teacher = nnx.merge(setup.layout.graphdef, start.teacher)
  tokens = teacher.backbone(jnp.asarray(batch["global"][:, 1]))
  want = teacher.head(jnp.mean(tokens[:, 1:], axis=1))
  got = jax.device_get(new).class_bank.embeddings[:config.batch_size]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(got, teacher.head(tokens[:, 0]), atol=1e-3)  # not the [CLS] token

  pooled = np.asarray(jnp.mean(tokens[:, 1:], axis=1), np.float64)
  feats = features.cls_features(teacher.backbone, pool="mean_patch")(batch["global"][:, 1])
  np.testing.assert_allclose(feats, pooled / np.linalg.norm(pooled, axis=1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  assert features.default_probe_convention(config.model) == "cls_meanpatch"


def test_knn_evaluation_reads_the_runs_global_pool(monkeypatch):
  """`evaluate.knn` scores what the run trained: the mean patch token for a mean-patch run,
  the [CLS] token otherwise (also for configs written before the field existed)."""
  asked = []

  def spy(model, *, mesh=None, pool="cls"):
    asked.append(pool)
    return None

  rng = np.random.default_rng(0)
  split = (rng.normal(size=(20, 4)).astype(np.float32), np.arange(20) % 2)
  monkeypatch.setattr(features, "cls_features", spy)
  monkeypatch.setattr(features, "train_and_eval_features", lambda *a, **k: (split, split, 2))
  for pool in ("mean_patch", "cls", None):
    config = default.get_config()
    if pool is None:
      del config.model["global_pool"]
    else:
      config.model.global_pool = pool
    knn.evaluate_knn(config, None, input_fn=None, ks=(1,))
  assert asked == ["mean_patch", "cls", "cls"]


# ------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("fields,words", [
    ({"method": "byol"}, "method='byol' is not one of 'sove', 'dino', 'ibot'"),
    ({"model.global_pool": "gap"}, "model.global_pool='gap' is not one of"),
    ({"sove.class_weight": 0.0, "sove.patch_weight": 0.0}, "both 0: no loss is left"),
    ({"sove.patch_weight": -1.0}, "sove.patch_weight=-1.0 must be >= 0"),
    ({"method": "dino", "baseline.class_weight": 0.0}, "DINO has only the \\[CLS\\] loss"),
    ({"method": "ibot", "baseline.num_prototypes": 1}, "baseline.num_prototypes=1 must be"),
    ({"method": "ibot", "baseline.teacher_patch_temp": 0.0}, "teacher_patch_temp=0.0 must be"),
    ({"method": "dino", "baseline.center_momentum": 1.0}, "center_momentum=1.0 must be in"),
    ({"method": "dino", "baseline.freeze_last_layer_epochs": -1}, "must be >= 0"),
])
def test_bad_method_configs_raise_one_sentence(fields, words):
  config = smoke.get_config()
  for name, value in fields.items():
    section, _, leaf = name.rpartition(".")
    (config[section] if section else config)[leaf] = value
  with pytest.raises(configuration.ConfigError, match=words):
    configuration.validate(config, num_devices=8)


def test_baselines_skip_the_sove_checks():
  """A baseline run is not refused for SOVE's banks (it has none)."""
  config = smoke.get_config()
  config.method, config.sove.num_anchors = "dino", 100_000
  configuration.validate(config, num_devices=8)


def test_baseline_schedules():
  """Each method's own temperatures; iBOT's patch temperature warms up over the same epochs;
  the prototype layer's frozen steps are freeze_last_layer_epochs of steps."""
  config = default.get_config()
  config.method = "ibot"
  config.baseline.update(teacher_temp_warmup=0.04, teacher_temp=0.07, teacher_patch_temp=0.06,
                         teacher_patch_temp_warmup=0.03, teacher_temp_warmup_epochs=2.0,
                         freeze_last_layer_epochs=1.5)
  s = optim.make_schedules(config, steps_per_epoch=10, total_steps=100)
  for step, temp, patch in ((0, 0.04, 0.03), (10, 0.055, 0.045), (20, 0.07, 0.06),
                            (90, 0.07, 0.06)):
    np.testing.assert_allclose(float(s.teacher_temp(step)), temp, rtol=1e-6)
    np.testing.assert_allclose(float(s.teacher_patch_temp(step)), patch, rtol=1e-6)
  assert s.frozen_last_layer_steps == 15
  config.method = "dino"
  s = optim.make_schedules(config, steps_per_epoch=10, total_steps=100)
  assert s.teacher_patch_temp is None and s.frozen_last_layer_steps == 15
  config.method = "sove"
  s = optim.make_schedules(config, steps_per_epoch=10, total_steps=100)
  assert s.teacher_patch_temp is None and s.frozen_last_layer_steps == 0
  np.testing.assert_allclose(float(s.teacher_temp(0)), config.sove.teacher_temp_warmup)


@pytest.mark.slow
def test_ibot_run_end_to_end_with_the_mean_patch_representation(tmp_path):
  """Train two iBOT steps on Fashion-MNIST with the k-NN monitor on the mean patch token, then
  load the checkpoint's backbone as the evaluation CLIs do: the prototype head's state
  (centers included) round-trips through the checkpoint."""
  pytest.importorskip("tensorflow")
  from sove_jax import checkpoint
  from sove_jax.evaluate import backbone

  config = _config("ibot", **{"model.global_pool": "mean_patch", "total_steps": 2,
                              "checkpoint_every": 2, "knn_every": 2, "knn_train_examples": 64,
                              "knn_k": (10, 20),
                              "knn_eval_examples": 32})
  last = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(last["train/loss"]) and 0.0 <= last["knn/top1_k20"] <= 100.0
  assert "train/teacher_patch_entropy" in last and "train/patch_loss" in last
  setup = train.build(config, sharding.make_mesh(config.mesh), steps_per_epoch=10)
  ck = checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=1)
  saved = ck.restore(state_lib.abstract_with_shardings(setup.layout)).state
  ck.close()
  assert int(saved.step) == 2 and set(saved.centers) == {"cls", "patch"}
  assert np.any(np.asarray(saved.centers["patch"]) != 0)
  run_config, vit = backbone.load_backbone(str(tmp_path))
  assert run_config.method == "ibot" and run_config.model.global_pool == "mean_patch"
  images = np.random.default_rng(0).normal(size=(4, 28, 28, 3)).astype(np.float32)
  tokens = np.asarray(vit(images), np.float64)
  pooled = tokens[:, 1:].mean(axis=1)
  np.testing.assert_allclose(features.cls_features(vit, pool="mean_patch")(images),
                             pooled / np.linalg.norm(pooled, axis=1, keepdims=True), atol=1e-5)
