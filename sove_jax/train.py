"""The training loop, top to bottom: config -> mesh -> data -> state -> jitted step -> loop.

`train_and_evaluate(config, workdir)` is what `python -m sove_jax.main` runs. It resumes from the
latest checkpoint in `workdir` (state, banks and input position), saves asynchronously every
`checkpoint_every` steps and at the end, saves and returns at the next step boundary after
SIGTERM (preemption), and stops with the step number on a non-finite loss. When each periodic
thing happens (logging, the k-NN monitor, checkpoints, preemption, the finiteness check) is
decided by `itstime`; progress (steps/s, ETA) and the optional profile are CLU periodic actions.
"""
import json
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from sove_jax import checkpoint, configuration, hosts, optim, reporting, sharding
from sove_jax import feed as feed_lib
from sove_jax import state as state_lib
from sove_jax import step as step_lib
from sove_jax.models import network


class NonFiniteLoss(FloatingPointError):
  """A step's loss or gradient was not finite; the message says what the checkpoints hold."""


def total_steps(config, steps_per_epoch: int) -> int:
  if config.total_steps > 0:
    return int(config.total_steps)
  return max(1, int(round(config.num_epochs * steps_per_epoch)))


def batch_shapes(config, mesh, resident: dict | None = None, host_flags: bool = False):
  """Abstract global batch (ShapeDtypeStructs with the batch sharding), for AOT compilation.

  `host_flags`: the int32 column of every host's flags the trainer's step takes
  (`hosts.agreeing`). By data.augment: "host", the views and masks; "device", uint8 canvases
  and their sizes, or, from an in-memory source, indices into its images on the device:
  `resident` (arrays or shapes, from `pipeline.device_resident`; by default `resident_shapes`),
  passed whole to every step, replicated (the step cuts the views and draws the masks).
  """
  d, b = config.data, config.batch_size
  g, l, c = d.global_size, d.local_size, d.canvas_size
  spec = {"label": ((b,), jnp.int32)}
  if d.augment == "host":
    tokens = network.token_grid(config.model, g) ** 2  # masks: the backbone's final token grid
    spec["mask"] = ((b, 2, tokens), jnp.bool_)
    spec["global"] = ((b, 2, g, g, 3), jnp.float32)
    if d.num_local:
      spec["local"] = ((b, d.num_local, l, l, 3), jnp.float32)
  elif d.source in configuration.IN_MEMORY_SOURCES:
    resident = resident or resident_shapes(config)
    spec["index"] = ((b,), jnp.int32)
  else:
    spec["canvas"] = ((b, c, c, 3), jnp.uint8)
    spec["size"] = ((b, 2), jnp.int32)
  if host_flags:
    spec["host_flags"] = ((b,), jnp.int32)
  sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  out = {k: jax.ShapeDtypeStruct(shape, dt, sharding=sh) for k, (shape, dt) in spec.items()}
  for k, v in (resident or {}).items():
    out[k] = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=rep)
  return out


def resident_shapes(config) -> dict:
  """`pipeline.device_resident`'s shapes without placing anything: the train split is read."""
  d = config.data
  if d.augment != "device" or d.source not in configuration.IN_MEMORY_SOURCES:
    return {}
  from sove_jax.data import sources  # TensorFlow enters the process here, host side only
  images = sources.open_source(d, d.train_split).images
  return {"images": jax.ShapeDtypeStruct(images.shape, images.dtype)}


class Setup(NamedTuple):
  """Everything static about a run, from `build`."""
  tx: optax.GradientTransformation
  schedules: optim.Schedules
  layout: state_lib.Layout  # the module graph, every state leaf's shape and sharding
  step: Any                 # the jitted step(state, batch) -> (state, metrics), state donated
  total_steps: int
  image_size: int
  batch: dict               # the abstract global batch (`batch_shapes`)


def build(config, mesh, steps_per_epoch: int, *, make_step=step_lib.make_train_step,
          resident: dict | None = None, host_flags: bool = False) -> Setup:
  """The optimizer, schedules, state layout and the jitted step. `make_step` builds the step
  function (benchmarks pass other steps through the same shardings); `resident`: see
  `batch_shapes`; `host_flags`: the step takes every host's flags in the batch and returns
  them reduced with its metrics (`hosts.agreeing`; the trainer's step)."""
  num_steps = total_steps(config, steps_per_epoch)
  schedules = optim.make_schedules(config, steps_per_epoch, num_steps)
  tx = optim.make_optimizer(config, schedules)
  image_size = config.data.global_size
  layout = state_lib.layout(config, tx, mesh, image_size)
  step_fn = make_step(config, layout.graphdef, tx, schedules,
                      anchor_sharding=sharding.batch_sharding(mesh))
  if host_flags:
    step_fn = hosts.agreeing(step_fn)
  batch = batch_shapes(config, mesh, resident, host_flags=host_flags)
  batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
  jitted = jax.jit(step_fn, in_shardings=(layout.shardings, batch_shardings),
                   out_shardings=(layout.shardings, sharding.replicated(mesh)), donate_argnums=0)
  return Setup(tx=tx, schedules=schedules, layout=layout, step=jitted, total_steps=num_steps,
               image_size=image_size, batch=batch)


def validated_mesh(config):
  """Checks the config against the devices and processes, then builds the mesh."""
  configuration.validate(config, num_devices=jax.device_count(),
                         process_count=jax.process_count())
  return sharding.make_mesh(config.mesh)


def compile_only(config, steps_per_epoch: int = 1000):
  """Lowers and compiles the step for the configured mesh; returns (compiled, text report)."""
  mesh = validated_mesh(config)
  setup = build(config, mesh, steps_per_epoch)
  abstract = state_lib.abstract_with_shardings(setup.layout)
  t0 = time.time()
  compiled = setup.step.lower(abstract, setup.batch).compile()
  mem = compiled.memory_analysis()
  n_params = sum(x.size for x in jax.tree.leaves(setup.layout.abstract.student))
  lines = [f"compiled the train step in {time.time() - t0:.1f} s on "
           f"{sharding.devices_summary(mesh)}",
           f"parameters (student, incl. head): {n_params / 1e6:.1f} M"]
  if mem is not None:
    gib = 1024 ** 3
    for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes", "alias_size_in_bytes"):
      lines.append(f"per device {name.replace('_in_bytes', '')}: "
                   f"{getattr(mem, name, 0) / gib:.3f} GiB")
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
    lines.append(f"per device peak (arguments + outputs + temporaries - aliased): "
                 f"{peak / gib:.3f} GiB")
  return compiled, "\n".join(lines)


def itstime(step: int, every: int, last: int | None = None) -> bool:
  """Whether periodic work is due after `step`: every `every` steps (0 or less: never) and at
  step `last`. Every cadence of the loop is decided here."""
  return (every > 0 and step % every == 0) or step == last


def _verified(step: int, metrics) -> dict:
  """The step's metrics on the host; stops the run if its loss or gradient was not finite (the
  step then left the state as it was: the state after step - 1)."""
  host = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not host.pop("finite"):
    raise NonFiniteLoss(step)
  return host


@jax.jit
def _largest_parameter(params):
  """The largest magnitude among `params` (a diverging run shows here first)."""
  return jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree.leaves(params)]))


# --- a run's workdir: what is there, and whether this config may continue it ---------------------


def _state_signature(config):
  """The train state's tree structure and every leaf's (shape, dtype): what a checkpoint must
  match to be restored under `config`."""
  leaves, treedef = jax.tree.flatten(state_lib.abstract(config))
  return treedef, [(x.shape, x.dtype) for x in leaves]


def _unrestorable(stored, config, changes: dict) -> list:
  """The changed fields that alter the train state's structure or shapes (so the checkpoints
  cannot be restored), each tried on its own on the stored config."""
  reference = _state_signature(stored)
  fields = []
  for field in changes:
    trial = ml_collections.ConfigDict(stored.to_dict())
    try:
      configuration.set_field(trial, field, configuration.get_field(config, field),
                              create=True, check_type=False)
      same = _state_signature(trial) == reference
    except Exception:  # noqa: BLE001  a field that breaks the state on its own changes it
      same = False
    if not same:
      fields.append(field)
  if not fields and _state_signature(config) != reference:
    fields = list(changes)
  return fields


def _check_continuation(config, workdir, *, allow_config_change: bool):
  """Compares `config` with the run already in `workdir` (before anything is written) and
  returns the accepted changes ({} for a new run or the same config). Raises ConfigError for a
  change the checkpoints cannot be restored under, and for any other change unless
  `allow_config_change`."""
  wd = checkpoint.workdir_path(workdir)
  if not (wd / checkpoint.CONFIG_FILE).exists():
    return {}
  stored = configuration.with_new_fields(checkpoint.read_config(wd))
  changes = configuration.changed_fields(stored, config)
  if not changes:
    return {}
  steps = checkpoint.checkpoint_steps(wd)
  if not steps:
    if not allow_config_change:
      raise configuration.ConfigError(
          f"{wd} holds a run configured otherwise ({configuration.describe_changes(changes)}) "
          "but no checkpoint: pass --allow_config_change to start it anew with this config "
          "(the old config.json is kept), or use another --workdir.")
    return changes
  fixed = _unrestorable(stored, config, changes)
  if fixed:
    shown = {k: changes[k] for k in fixed}
    raise configuration.ConfigError(
        f"The checkpoints in {wd} cannot be restored under this config: "
        f"{configuration.describe_changes(shown)} change the train state; use another "
        "--workdir, or drop those overrides.")
  if not allow_config_change:
    raise configuration.ConfigError(
        f"This config differs from the run's in {wd}: {configuration.describe_changes(changes)}"
        "; its checkpoints can continue under it: pass --allow_config_change to do so (the "
        f"change is recorded in {checkpoint.CHANGES_FILE}), or use another --workdir.")
  return changes


def _nonfinite_report(step: int, ckpt) -> str:
  """What a non-finite step leaves: which checkpoints exist and how large their parameters
  are, where a restart resumes, and how to resume from an earlier step."""
  try:
    ckpt.wait()
    steps = ckpt.all_steps()
  except checkpoint.CheckpointError:
    steps = checkpoint.checkpoint_steps(ckpt.workdir)
  line = f"Non-finite loss or gradient at step {step}: the run stops. "
  if not steps:
    return line + "No checkpoint was saved before it: a restart begins a new run."

  def described(s):
    largest = checkpoint.saved_notes(ckpt.workdir, s).get("largest_parameter")
    return f"step {s}" + ("" if largest is None else f" (parameters up to {largest:.3g})")

  line += (f"Checkpoints in {ckpt.directory}: {', '.join(map(described, reversed(steps)))}; "
           f"a restart resumes from step {steps[-1]}")
  if len(steps) > 1:
    line += (f"; to resume from an earlier one, restart with --restore_step={steps[-2]} (later "
             "ones are set aside, not deleted)")
  return line + "."


def train_and_evaluate(config, workdir: str, *, restore_step: int | None = None,
                       allow_config_change: bool = False) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the last logged metrics.

  `restore_step` resumes from that checkpoint instead of the latest (later ones are set aside);
  `allow_config_change` lets a restart continue under a config that differs from the run's in
  fields the checkpoints can be restored under (the change is recorded in the workdir).

  SIGTERM and a first Ctrl-C save at the next step boundary (in a multi-process run, the same
  step on every process, `hosts`) and return; a second Ctrl-C aborts. With several processes a
  watchdog bounds every wait for the others (`hosts.Watchdog`).
  """
  signals = hosts.StopSignals()
  watchdog = hosts.Watchdog(config.hosts) if jax.process_count() > 1 else None
  try:
    return _train(config, workdir, signals, watchdog, restore_step=restore_step,
                  allow_config_change=allow_config_change)
  finally:
    signals.restore()
    if watchdog is not None:
      watchdog.close()


def _train(config, workdir, signals: hosts.StopSignals, watchdog: hosts.Watchdog | None, *,
           restore_step: int | None, allow_config_change: bool) -> dict:
  multi = jax.process_count() > 1
  mesh = validated_mesh(config)
  changes = _check_continuation(config, workdir, allow_config_change=allow_config_change)
  from clu import periodic_actions

  from sove_jax.data import pipeline  # TensorFlow enters the process here, host side only
  wd = checkpoint.workdir_path(workdir)
  reporting.say(f"sove_jax: {sharding.devices_summary(mesh)}; workdir {wd}")

  train_in = pipeline.train_input(config.data, patch_size=config.model.patch_size,
                                  global_batch_size=config.batch_size, seed=config.seed,
                                  token_stride=network.token_stride(config.model))
  # Device mode from an in-memory source: its images, placed once, join every batch.
  resident = pipeline.device_resident(train_in, sharding.replicated(mesh))
  setup = build(config, mesh, train_in.steps_per_epoch, resident=resident, host_flags=True)
  num_steps = setup.total_steps
  configuration.validate_schedule(config, steps_per_epoch=train_in.steps_per_epoch,
                                  total_steps=num_steps)
  # Nothing was written before this line.
  if jax.process_index() == 0:
    checkpoint.check_writable(wd)
    checkpoint.hold_workdir(wd)   # one training run per workdir
  ckpt = checkpoint.Checkpointer(wd, keep=config.keep_checkpoints, keep_period=config.keep_period)
  try:
    restored = ckpt.restore(state_lib.abstract_with_shardings(setup.layout), step=restore_step)
    if restored is None:
      if restore_step is not None:
        raise checkpoint.CheckpointError(f"--restore_step={restore_step}: {ckpt.directory} "
                                         "holds no checkpoint.")
      if changes:
        kept = wd / checkpoint.SET_ASIDE / f"config.{int(time.time())}.json"
        reporting.say(f"new run in {wd} with another config "
                      f"({configuration.describe_changes(changes)}); the previous config.json "
                      f"is kept as {kept}")
        if jax.process_index() == 0:
          kept.parent.mkdir(parents=True, exist_ok=True)
          (wd / checkpoint.CONFIG_FILE).rename(kept)
      if jax.process_index() == 0 and not (wd / checkpoint.CONFIG_FILE).exists():
        checkpoint.write_config(config, wd)
      state = state_lib.create(config, setup.tx, setup.layout, setup.image_size)
      reporting.say(f"new run: {num_steps} steps of {config.batch_size} images "
                    f"({train_in.steps_per_epoch} steps per epoch)")
    else:
      state = restored.state
      train_in.set_state(restored.data)
      later = [s for s in ckpt.all_steps() if s > restored.step]
      if later:
        reason = "corrupt" if restore_step is None else f"after_restore_step_{restore_step}"
        ckpt.set_aside(later, reason)
        logging.warning("Checkpoint step(s) %s set aside in %s (%s): the run continues from "
                        "step %d.", ", ".join(map(str, later)), wd / checkpoint.SET_ASIDE,
                        reason.replace("_", " "), restored.step)
      if changes:
        checkpoint.record_config_change(wd, restored.step, changes)
        reporting.say(f"continuing step {restored.step} with a changed config: "
                      f"{configuration.describe_changes(changes)} (recorded in "
                      f"{wd / checkpoint.CHANGES_FILE})")
      if multi:  # every process, with its own input position (each has its own stream)
        logging.info("resumed from step %d of %d; process %d's input at %s", restored.step,
                     num_steps, jax.process_index(), train_in.get_state())
      else:
        reporting.say(f"resumed from step {restored.step} of {num_steps}")
  except BaseException:
    ckpt.close()
    raise
  start = int(jax.device_get(state.step))
  if jax.process_index() == 0:
    reporting.drop_metrics_after(wd, start)  # steps about to be re-run are logged once
  stop_at = num_steps if config.run_steps < 0 else min(num_steps, start + config.run_steps)

  batch_sharding = sharding.batch_sharding(mesh)
  writer = reporting.open_writer(wd, enabled=jax.process_index() == 0)
  writer.write_hparams(config.to_dict())
  monitor = knn_monitor(config, mesh, pipeline, setup.layout.graphdef) if config.knn_every else None
  # Steps per second between logged steps; the first call (after the first step, compiled by
  # then) only starts the clock, so the rate and the ETA leave compilation out.
  perf = reporting.Collector("perf/")
  progress = periodic_actions.ReportProgress(
      num_train_steps=num_steps, writer=perf, every_steps=max(config.log_every, 1),
      every_secs=None, on_steps=(stop_at,))
  profile = _profiler(config, wd, start, stop_at)
  window = reporting.Window(last=step_lib.SCHEDULE_METRICS)
  if watchdog is not None:
    watchdog.beat(start, "compilation", slow=True)
  train_step = _compiled_everywhere(setup, config, mesh)
  sent = {k: v for k, v in setup.batch.items() if k not in resident and k != "host_flags"}
  feed = feed_lib.Feed(train_in, batch_sharding, depth=config.prefetch_to_device,
                       local_shapes=feed_lib.local_shapes(sent, jax.process_count()),
                       stop_signals=signals, raise_input_errors=not multi)
  rows_per_host = config.batch_size // jax.process_count()
  input_state = train_in.get_state()  # the position after the last batch a step consumed
  last, pending = {}, None
  agreed = hosts.Agreed(0, 0, hosts._NO_PROCESS, rows_per_host)

  def read(pending):
    """A step's metrics on the host; its reduced host flags join `agreed` first (a host's failed
    input, whose zeros may well make the loss non-finite, is what every host reports), then the
    loss and gradient are verified finite."""
    nonlocal agreed
    step, metrics = pending
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    agreed = agreed.joined(hosts.Agreed.from_metrics(host, rows_per_host))
    if agreed.input_failed:
      raise _input_failure(feed, agreed, step, ckpt)
    return _verified(step, host)

  try:
    if watchdog is not None:
      watchdog.beat(start, "first step", slow=True)
    for step in range(start + 1, stop_at + 1):
      item = next(feed)
      state, metrics = train_step(state, item.batch | resident)
      input_state = item.input_state
      # The previous step's metrics are read only now, so the host never stalls the device;
      # with them come every host's flags, the same on every host (`hosts`).
      if pending is not None:
        window.add(read(pending))
        if watchdog is not None:
          watchdog.beat(step - 1)
      pending = (step, metrics)
      progress(step)
      if profile is not None:
        profile(step)
      ckpt.check()  # a background save that failed stops the run here, not minutes later

      log_due = itstime(step, config.log_every, stop_at)
      monitor_due = monitor is not None and itstime(step, config.knn_every, num_steps)
      save_due = itstime(step, config.checkpoint_every, stop_at)
      # One process stops on its own signal; several stop on what they all read.
      stop = agreed.stop if multi else signals.reason is not None
      if not (log_due or monitor_due or save_due or stop):
        continue
      window.add(read(pending))  # only verified states are reported or saved
      pending = None
      stop = agreed.stop if multi else signals.reason is not None
      scalars = {}
      if log_due:
        scalars = window.pop()
        scalars.update(perf.pop())
        if "perf/steps_per_sec" in scalars:
          scalars["perf/images_per_sec"] = scalars["perf/steps_per_sec"] * config.batch_size
        reporting.say(reporting.progress_line(step, num_steps, scalars))
      if monitor_due:
        if watchdog is not None:
          watchdog.beat(step, "k-NN monitor", slow=True)
        with progress.timed("k-NN monitor"):
          knn_scalars = monitor(state)
        reporting.say(reporting.knn_line(step, knn_scalars))
        scalars.update(knn_scalars)
      if scalars:
        writer.write_scalars(step, scalars)
        last = scalars
      if save_due or stop:
        if watchdog is not None:
          watchdog.beat(step, "checkpoint save", slow=True)
        ckpt.save(step, state, _input_states(input_state),
                  notes={"largest_parameter": float(_largest_parameter(state.student))})
      if stop:
        ckpt.wait()
        why = f"{agreed.signals()} on {agreed.who()}" if multi else signals.reason
        logging.info("stopped (%s): saved step %d, exiting", why, step)  # every process says so
        break
      if watchdog is not None:
        watchdog.beat(step)
    else:
      if multi:
        logging.info("process %d trained to step %d", jax.process_index(), stop_at)
    ckpt.wait()
    return last
  except NonFiniteLoss as e:
    raise NonFiniteLoss(_nonfinite_report(e.args[0], ckpt)) from None
  except (hosts.RunStopped, configuration.ConfigError):
    raise  # every process stops alike, each with its line
  except BaseException as e:
    if multi:  # the others would wait for this process: name who answers, then end now
      hosts.abandon(e, jax.process_index(), jax.process_count(), config.hosts.answer_s)
    raise
  finally:
    feed.close()
    ckpt.close()
    writer.close()


def _input_failure(feed, agreed: hosts.Agreed, step: int, ckpt) -> "hosts.RunStopped":
  """The error every process raises after a host's input failed: this host's own error, or
  which process failed; no save (the step took a host's zeros), the last checkpoint named."""
  steps = checkpoint.checkpoint_steps(ckpt.workdir)
  kept = (f"the last checkpoint is step {steps[-1]}" if steps else "no checkpoint was saved")
  if feed.error is not None:
    return hosts.RunStopped(f"The input of process {jax.process_index()} failed: "
                            f"{reporting.error_line(feed.error)} Every process stops after step "
                            f"{step}; {kept}.")
  return hosts.RunStopped(f"The input of {agreed.who()} failed (its log says why): every "
                          f"process stops after step {step}; {kept}.")


def _input_states(state: dict) -> dict:
  """What a checkpoint holds of the input: every process's position (`pipeline.merge_states`),
  gathered from all processes (a small allgather of their JSON, at save steps only)."""
  from jax.experimental import multihost_utils

  from sove_jax.data import pipeline
  if jax.process_count() == 1:
    return pipeline.merge_states([state])
  text = json.dumps(state).encode()
  size = int(multihost_utils.process_allgather(np.int32(len(text))).max())
  padded = np.zeros(size, np.uint8)
  padded[:len(text)] = np.frombuffer(text, np.uint8)
  gathered = multihost_utils.process_allgather(padded)
  return pipeline.merge_states([json.loads(bytes(row).rstrip(b"\0").decode())
                                for row in np.asarray(gathered)])


def _compiled_everywhere(setup: Setup, config, mesh):
  """The step compiled ahead of the loop; then every process waits for the others at a barrier
  of the coordination service, so the first step's collectives start together (CPU processes'
  gloo collectives wait only 30 s for a late one, less than compilation can differ)."""
  t0 = time.time()
  compiled = setup.step.lower(state_lib.abstract_with_shardings(setup.layout),
                              setup.batch).compile()
  reporting.say(f"compiled the train step in {time.time() - t0:.1f} s")
  if jax.process_count() > 1:
    from orbax.checkpoint import multihost
    multihost.get_barrier_sync_fn()(key="sove_jax_train_step_compiled",
                                     timeout_ms=int(config.hosts.slow_timeout_s * 1000))
  return compiled


def _profiler(config, workdir, start: int, stop_at: int):
  """With `config.profile`, CLU's periodic profiler: a jax.profiler trace of up to 5 steps
  after the first (compiled) one, into `workdir/plugins/profile` for TensorBoard."""
  if not config.profile:
    return None
  from clu import periodic_actions

  first = start + 2
  num_steps = min(5, stop_at - first)
  if num_steps < 1:
    logging.warning("config.profile: the run has too few steps left to trace (%d).",
                    stop_at - start)
    return None
  return periodic_actions.Profile(logdir=workdir, num_profile_steps=num_steps,
                                  profile_duration_ms=None, first_profile=first,
                                  every_secs=None)


def knn_inputs(config, mesh, pipeline):
  """The monitor's (train-memory, evaluation) batches: the config's monitor splits (by default
  the validation split, carved from the train split, so that nothing chosen by watching the
  monitor has seen the test split) and example counts."""
  eval_batch = max(config.batch_size, mesh.devices.size)
  train_batches = pipeline.eval_input(config.data, split=config.knn_train_split,
                                      global_batch_size=eval_batch,
                                      max_examples=config.knn_train_examples)
  eval_batches = pipeline.eval_input(config.data, split=config.knn_eval_split,
                                     global_batch_size=eval_batch,
                                     max_examples=config.knn_eval_examples)
  return train_batches, eval_batches


def knn_monitor(config, mesh, pipeline, graphdef):
  """run(state) -> {"knn/top1_k{k}": %}: k-NN of the teacher backbone's global representation
  ([CLS], or the mean patch token with `model.global_pool="mean_patch"`) on the monitor's
  memory -> query splits (`knn_train_split`, `knn_eval_split`); `run(apply_fn=f)` scores
  features `f(images)` instead (baselines)."""
  from flax import nnx

  from sove_jax.evaluate import features, knn

  train_batches, eval_batches = knn_inputs(config, mesh, pipeline)
  pool = config.model.global_pool

  @jax.jit
  def embed(teacher_params, images):  # the evaluator's features, so its figures are the same
    return features.knn_features(nnx.merge(graphdef, teacher_params).backbone, images, pool)

  def run(state=None, *, apply_fn=None):
    fn = apply_fn or (lambda images: embed(state.teacher, images))
    return knn.knn_monitor(fn, train_batches, eval_batches, ks=tuple(config.knn_k),
                           temperature=config.knn_temperature,
                           sharding=sharding.batch_sharding(mesh))

  return run
