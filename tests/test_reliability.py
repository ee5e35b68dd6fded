"""Faults a run meets, and what it does with each: the README's fault table, item by item.

Runs that must be separate processes (a kill, a second process on the same workdir, a command's
exit code and console) go through the commands themselves; they inherit the session's 8 fake CPU
devices and compilation cache. Most cases start from the session's finished smoke run
(`trained`, 4 steps, a checkpoint at every step), copied.
"""
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from configs import smoke
from sove_jax import checkpoint, configuration, continuation, reporting, sharding, train
from sove_jax import state as state_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = "--config=configs/smoke.py"
TRAINED_FIELDS = {"checkpoint_every": 1, "keep_checkpoints": 10}  # `trained`'s config
TRAINED = tuple(f"--config.{k}={v}" for k, v in TRAINED_FIELDS.items())


def _run(module, *args, timeout=300, env=None, prefix=()):
  """(exit code, output, seconds) of `python -m module args` (or `python *prefix args`)."""
  cmd = [sys.executable, *(prefix or ("-m", module)), *args]
  t0 = time.time()
  proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, timeout=timeout, env=env)
  return proc.returncode, proc.stdout, time.time() - t0


def _main(workdir, *args, **kw):
  return _run("sove_jax.main", SMOKE, f"--workdir={workdir}", *args, **kw)


def _one_line_failure(code, out, *words):
  """Exit code 1, no traceback, and one ERROR line holding `words`."""
  assert code == 1, out
  assert "Traceback" not in out, out
  errors = [line for line in out.splitlines() if " ERROR " in line or line.startswith(
      ("Error:", "Config error"))]
  assert len(errors) == 1, out
  for word in words:
    assert word in errors[0], errors[0]
  return errors[0]


def _fails_in_one_line(workdir, *words, **fields):
  """The smoke run under `fields` (`a__b=v` sets `a.b`) stops before training with an expected
  error whose line (`reporting.error_line`, what the command prints) holds `words`. In process:
  the command's own exit path (code 1, no traceback) is tested once, by the typo test below."""
  config = smoke.get_config()
  for field, value in fields.items():
    configuration.set_field(config, field.replace("__", "."), value)
  with pytest.raises(reporting.expected_errors()) as failure:
    train.train_and_evaluate(config, str(workdir))
  line = reporting.error_line(failure.value)
  assert "\n" not in line, line
  for word in words:
    assert word in line, line
  return line


def _abstract(config):
  mesh = sharding.make_mesh(config.mesh)
  setup = train.build(config, mesh, steps_per_epoch=1)
  return state_lib.abstract_with_shardings(setup.layout)


def _restore(workdir, step=None):
  ck = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    return ck.restore(_abstract(checkpoint.read_config(workdir)), step=step)
  finally:
    ck.close()


def _same(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))))


@pytest.fixture
def trained(smoke_run):
  """The session's finished smoke run (tests/conftest.py): 4 steps, a checkpoint at each (all
  kept); its config is the command line's `SMOKE TRAINED`. Tests that write copy it."""
  return smoke_run


def _copy(trained, tmp_path):
  target = tmp_path / "run"
  shutil.copytree(trained, target)
  return target


def _metric_steps(workdir):
  return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _metric_steps_so_far(workdir):
  """The steps in metrics.jsonl while a run writes it: none before the file exists, and a last
  line still being written is not read."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  lines = path.read_text().split("\n")[:-1]  # only lines ended by a newline are whole
  return [json.loads(line)["step"] for line in lines]


def _run_until_step(workdir, step, *args, limit=300):
  """Starts a long smoke run and reads its console up to the progress line of `step` (the step
  number is right-aligned to the total's width); returns the process and the lines read. The
  process is killed after `limit` seconds whatever happens, so a test never hangs."""
  proc = subprocess.Popen([sys.executable, "-m", "sove_jax.main", SMOKE, f"--workdir={workdir}",
                           "--config.total_steps=100000", *args],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  watchdog = threading.Timer(limit, proc.kill)
  watchdog.daemon = True
  watchdog.start()
  lines, pattern = [], re.compile(rf"step +{step}/100000 ")
  for line in proc.stdout:
    lines.append(line)
    if pattern.search(line):
      return proc, lines
  proc.wait()
  raise AssertionError(f"the run ended (exit code {proc.returncode}) before step {step}:\n"
                       + "".join(lines))


# --- 1. keep_checkpoints=0 ------------------------------------------------------------------------

@pytest.mark.slow
def test_keep_checkpoints_zero_is_refused_and_one_keeps_the_final_checkpoint(tmp_path):
  config = smoke.get_config()
  config.keep_checkpoints = 0
  with pytest.raises(configuration.ConfigError, match="keep_checkpoints=0 .* every checkpoint, "
                     "the final one included, would be deleted"):
    configuration.validate(config, num_devices=8)
  _fails_in_one_line(tmp_path / "w", "keep_checkpoints=0", keep_checkpoints=0)
  assert not (tmp_path / "w").exists()  # refused before anything is written
  config = smoke.get_config()
  config.keep_checkpoints = 1
  train.train_and_evaluate(config, str(tmp_path / "one"))
  assert checkpoint.checkpoint_steps(tmp_path / "one") == [4]


# --- 2. a save that fails -------------------------------------------------------------------------

@pytest.mark.slow
def test_checkpoint_directory_removed_during_the_run_stops_it_in_seconds(tmp_path):
  """The checkpoints folder is taken away and a file put in its place while the run saves every
  step: one line naming the folder and the cause, exit code 1, within seconds."""
  workdir = tmp_path / "w"
  proc, lines = _run_until_step(workdir, 3, "--config.checkpoint_every=1")
  (workdir / "checkpoints").rename(workdir / "moved")  # at once, while Orbax may be writing
  (workdir / "checkpoints").write_text("not a folder")
  removed = time.time()
  out, _ = proc.communicate(timeout=120)
  elapsed = time.time() - removed
  out = "".join(lines) + out
  error = _one_line_failure(proc.returncode, out, "Saving checkpoint step",
                            str(workdir / "checkpoints"))
  assert "no complete checkpoint is left" in error or "is intact" in error
  assert elapsed < 60, f"{elapsed:.0f} s from the removal to the exit"


_READ_ONLY_DRIVER = """
import subprocess, sys
import orbax.checkpoint as ocp
from absl import app
from sove_jax import main
directory, *argv = sys.argv[1:]
save = ocp.CheckpointManager.save
def failing_save(self, step, *args, **kwargs):
  if step == 4:  # step 2 is complete (saves are one at a time); the disk turns read-only now
    subprocess.run(["mount", "--bind", directory, directory], check=True)
    subprocess.run(["mount", "-o", "remount,ro,bind", directory], check=True)
  return save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = failing_save
sys.argv = ["main", *argv]
app.run(main.main, flags_parser=main._parse_flags)
"""


def _can_mount(tmp_path) -> bool:
  probe = tmp_path / "mount_probe"
  probe.mkdir()
  ok = subprocess.run(["mount", "--bind", probe, probe], capture_output=True).returncode == 0
  if ok:
    subprocess.run(["umount", probe], check=True)
  return ok


@pytest.mark.slow
def test_read_only_checkpoint_disk_keeps_the_last_complete_checkpoint(tmp_path):
  """Orbax's own save hits a read-only disk (a bind mount, turned read-only just before the save
  of step 4): one line naming the folder and the cause, exit code 1 in seconds (not Orbax's
  5-minute shutdown), and step 2 restores whole."""
  if not _can_mount(tmp_path):
    pytest.skip("needs permission to bind-mount a folder read-only (root with CAP_SYS_ADMIN)")
  workdir = tmp_path / "w"
  (workdir / "checkpoints").mkdir(parents=True)
  try:
    code, out, seconds = _run(None, str(workdir / "checkpoints"), SMOKE, f"--workdir={workdir}",
                              "--config.total_steps=8", "--config.checkpoint_every=2",
                              prefix=("-c", _READ_ONLY_DRIVER))
  finally:
    subprocess.run(["umount", workdir / "checkpoints"], capture_output=True)
  _one_line_failure(code, out, "Saving checkpoint step 4 failed", "Read-only file system",
                    "the last complete checkpoint, step 2")
  assert seconds < 240
  assert checkpoint.checkpoint_steps(workdir) == [2]
  assert _restore(workdir).step == 2  # complete, its checksums verified


# --- 3. a restart with another config -------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_on_a_workdir_in_use_is_refused_in_one_line(tmp_path):
  """Two runs started on one workdir would interleave their metrics and checkpoints: the second
  is refused, naming the first; the lock goes with the process that held it."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  hold = ("import sys, time; from sove_jax import checkpoint; checkpoint.hold_workdir(sys.argv[1]);"
          " print('held', flush=True); time.sleep(600)")
  holder = subprocess.Popen([sys.executable, "-c", hold, str(workdir)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    code, out, _ = _main(workdir)
    _one_line_failure(code, out, f"{workdir} is in use by another training run (pid "
                      f"{holder.pid} on host", "another --workdir")
    assert "compiled the train step" not in out
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()
  finally:
    holder.kill()
    holder.wait()
  code, out, _ = _run(None, str(workdir), prefix=("-c", hold.replace("time.sleep(600)", "pass")))
  assert code == 0 and out.strip() == "held", out   # a killed holder leaves no stale lock
  checkpoint.hold_workdir(workdir)
  checkpoint.hold_workdir(workdir)   # the same process again (an in-process resume): it holds it


@pytest.mark.slow
def test_restart_with_another_config_is_compared_before_anything_is_written(trained, tmp_path,
                                                                            caplog):
  workdir = _copy(trained, tmp_path)
  original = (workdir / "config.json").read_bytes()
  listing = sorted(p.name for p in workdir.iterdir())
  error = _fails_in_one_line(workdir, "cannot be restored", "model.width 32 -> 64",
                             "sove.patch_bank_size 128 -> 256", **TRAINED_FIELDS,
                             model__width=64, sove__patch_bank_size=256, log_every=2)
  assert "log_every" not in error  # only the fields that change the state are listed
  _fails_in_one_line(workdir, "batch_size 16 -> 32", "total_steps 4 -> 6",
                     "--allow_config_change", **TRAINED_FIELDS, total_steps=6, batch_size=32)
  assert (workdir / "config.json").read_bytes() == original
  assert sorted(p.name for p in workdir.iterdir()) == listing  # nothing written
  config = smoke.get_config()
  config.update(TRAINED_FIELDS, total_steps=6)
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, str(workdir), allow_config_change=True)
  assert "continuing step 4 with a changed config: total_steps 4 -> 6" in caplog.text
  assert (workdir / "config.json").read_bytes() == original  # the original stays
  record = checkpoint.config_changes(workdir)
  assert [(r["step"], r["changes"]) for r in record] == [(4, {"total_steps": [4, 6]})]
  assert checkpoint.read_config(workdir).total_steps == 6
  assert checkpoint.read_config(workdir, with_changes=False).total_steps == 4
  assert checkpoint.checkpoint_steps(workdir)[-1] == 6
  again = smoke.get_config()  # the changed config is now the run's: a restart asks nothing
  again.update(checkpoint_every=1, keep_checkpoints=10, total_steps=6)
  assert continuation.changed_fields(checkpoint.read_config(workdir), again) == {}


# --- 4. after a non-finite loss -------------------------------------------------------------------

def _poisoned_run(monkeypatch, workdir, at_step, **fields):
  from sove_jax import feed
  config = smoke.get_config()
  config.total_steps = 6
  config.update(fields)
  real, calls = feed.to_global, {"n": 0}

  def poisoned(batch, sh):
    calls["n"] += 1
    if calls["n"] == at_step:
      batch = dict(batch, **{"global": np.full_like(batch["global"], np.nan)})
    return real(batch, sh)

  monkeypatch.setattr(feed, "to_global", poisoned)
  with pytest.raises(train.NonFiniteLoss) as failure:
    train.train_and_evaluate(config, str(workdir))
  return str(failure.value)


@pytest.mark.slow
def test_non_finite_loss_says_what_the_checkpoints_hold(tmp_path, monkeypatch):
  message = _poisoned_run(monkeypatch, tmp_path / "a", 3, checkpoint_every=1, keep_checkpoints=10)
  assert "Non-finite loss or gradient at step 3" in message
  assert "step 2 (parameters up to" in message and "step 1 (parameters up to" in message
  assert "a restart resumes from step 2" in message and "--restore_step=1" in message
  # The non-finite step is not saved: the last checkpoint holds step 2's finite parameters.
  assert checkpoint.checkpoint_steps(tmp_path / "a") == [1, 2]
  saved = _restore(tmp_path / "a").state
  assert int(saved.step) == 2
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(saved.student))
  # Nothing is saved unasked: with checkpoint_every=4, steps 1 and 2 leave no checkpoint.
  message = _poisoned_run(monkeypatch, tmp_path / "b", 3, checkpoint_every=4)
  assert "No checkpoint was saved before it: a restart begins a new run." in message
  assert checkpoint.checkpoint_steps(tmp_path / "b") == []


@pytest.mark.slow
def test_restore_step_resumes_from_an_earlier_checkpoint(trained, tmp_path, caplog):
  """--restore_step=2: later checkpoints set aside (not deleted), steps 3 and 4 taken again to
  the same state, and each step logged once in metrics.jsonl."""
  workdir = _copy(trained, tmp_path)
  config = smoke.get_config()
  config.update(TRAINED_FIELDS)
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, str(workdir), restore_step=2)
  assert "resumed from step 2 of 4" in caplog.text
  aside = workdir / checkpoint.SET_ASIDE
  assert sorted(p.name for p in aside.iterdir()) == ["3.after_restore_step_2",
                                                     "4.after_restore_step_2"]
  assert checkpoint.checkpoint_steps(workdir) == [1, 2, 3, 4]
  assert _same(_restore(workdir, 4).state, _restore(trained, 4).state)
  assert _metric_steps(workdir) == [1, 2, 3, 4]
  superseded = (workdir / reporting.SUPERSEDED_FILE).read_text().splitlines()
  assert [json.loads(line)["step"] for line in superseded] == [3, 4]
  with pytest.raises(reporting.expected_errors()) as failure:
    train.train_and_evaluate(config, str(workdir), restore_step=7)
  line = reporting.error_line(failure.value)
  assert "No checkpoint of step 7" in line and "steps there: 1, 2, 3, 4" in line, line


# --- 5. settings that would silently do something else ----------------------------------------------

@pytest.mark.parametrize("field,value,words", [
    ("optim.clip", -1.0, "optim.clip=-1.0 must be >= 0"),
    ("total_steps", 0, "total_steps=0 must be > 0, or -1"),
    ("knn_k", (0, 20), "knn_k=(0, 20) must be neighbor counts >= 1"),
    ("knn_k", (10, 300), "asks for 300 neighbors but the k-NN monitor's memory holds "
     "knn_train_examples=256"),
    ("log_every", 0, "log_every=0 must be >= 1"),
    ("model.patch_size", 0, "model.patch_size=0 must be > 0"),
    ("model.depth", -2, "model.depth=-2 must be >= 0"),
    ("model.num_heads", 0, "width 32 must be divisible by its 3 heads (model.variant='ti'"),
])
def test_settings_that_would_do_something_else_are_config_errors(field, value, words):
  config = smoke.get_config()
  config.knn_every = 2
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(configuration.ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
    configuration.validate(config, num_devices=8)


def test_schedules_longer_than_the_run_are_config_errors(caplog):
  config = smoke.get_config()
  config.optim.warmup_epochs = 0.5
  with pytest.raises(configuration.ConfigError, match="warmup_epochs=0.5 is 5 steps, not "
                     "shorter than the run's 4: the learning rate would never decay"):
    configuration.validate_schedule(config, steps_per_epoch=10, total_steps=4)
  config.optim.warmup_epochs = 0.0
  config.sove.teacher_temp_warmup_epochs = 1.0
  with pytest.raises(configuration.ConfigError, match="never reach sove.teacher_temp"):
    configuration.validate_schedule(config, steps_per_epoch=10, total_steps=4)
  # The evaluation's k larger than its memory is said, not silent.
  from sove_jax.evaluate import knn
  rng = np.random.default_rng(0)
  with caplog.at_level("WARNING"):
    knn.knn_predict(rng.normal(size=(8, 4)), np.arange(8) % 2, rng.normal(size=(3, 4)),
                    ks=(2, 20), num_classes=2)
  assert "k=20 exceeds the 8 train features" in caplog.text


@pytest.mark.slow
def test_main_refuses_a_typo_and_a_warmup_longer_than_the_run_in_one_line(tmp_path):
  """The training command's exit path, in real processes: a typo in an override and a bad value
  end in one line and exit code 1 before anything compiles or is written; --verbose shows the
  traceback."""
  code, out, _ = _main(tmp_path / "w", "--config.optim.wramup_epochs=1")
  _one_line_failure(code, out, "--config.optim.wramup_epochs", "no field 'wramup_epochs'",
                    'did you mean "warmup_epochs"')
  code, out, _ = _main(tmp_path / "w", "--config.model.patch_size=0", "--verbose")
  assert code == 1 and "Traceback" in out and "model.patch_size=0 must be > 0" in out
  assert "compiled the train step" not in out and not (tmp_path / "w").exists()
  _fails_in_one_line(tmp_path / "w", "optim.warmup_epochs=1.0 is 3750 steps",
                     optim__warmup_epochs=1.0)
  assert not (tmp_path / "w").exists()


# --- 6. a corrupt latest checkpoint ----------------------------------------------------------------

def _largest_file(folder):
  return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip(path, offset):
  data = bytearray(path.read_bytes())
  data[offset] ^= 0xFF
  path.write_bytes(bytes(data))


def _flip_stored_array(state_dir):
  """Flips a byte in the middle of the largest array chunk stored under `state_dir`, where the
  OCDBT store says the chunk lies. (Not "the middle of the largest file": a data file also holds
  bytes a restore never reads, and where the chunks fall in it varies from save to save; a flip
  there leaves the checkpoint intact, so restoring it is right, and such a test would only pass
  by the layout's luck.)"""
  import tensorstore as ts
  store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state_dir}/"}).result()
  chunks = [bytes(store.read(key).result().value) for key in store.list().result()]
  chunk = max(chunks, key=len)
  for path in (p for p in state_dir.rglob("*") if p.is_file()):
    at = path.read_bytes().find(chunk)
    if at >= 0:
      return _flip(path, at + len(chunk) // 2)
  raise AssertionError(f"no file under {state_dir} holds its largest chunk whole")


def _truncate(path):
  path.write_bytes(path.read_bytes()[:100])


CORRUPTIONS = {
    "flipped bytes": (lambda step: _flip_stored_array(step / "state"), "differ from the checksums"),
    "truncated data file": (lambda step: _truncate(_largest_file(step / "state")), "OUT_OF_RANGE"),
    "missing manifest": (lambda step: (step / "state" / "manifest.ocdbt").unlink(),
                         "manifest.ocdbt is missing"),
    "broken metadata JSON": (lambda step: (step / "state" / "_METADATA").write_text('{"tree'),
                             "_METADATA is not valid JSON"),
}


@pytest.mark.slow
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_with_a_warning(trained, tmp_path, corruption,
                                                             caplog):
  workdir = _copy(trained, tmp_path)
  damage, words = CORRUPTIONS[corruption]
  damage(workdir / "checkpoints" / "4")
  with caplog.at_level("WARNING"):
    got = _restore(workdir)
  assert got.step == 3
  assert _same(got.state, _restore(trained, 3).state)
  assert "Checkpoint step 4" in caplog.text and "is corrupt" in caplog.text
  assert words in caplog.text
  with pytest.raises(checkpoint.CheckpointError, match=f"step 4 .* cannot be restored: .*{words}"):
    _restore(workdir, step=4)  # asked for by name: no fallback, one sentence


def test_no_readable_checkpoint_is_one_sentence_naming_the_files(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  for step in (1, 2, 3, 4):
    (workdir / "checkpoints" / str(step) / "state" / "manifest.ocdbt").unlink()
  with pytest.raises(checkpoint.CheckpointError, match="No readable checkpoint in .*: step 4: "
                     ".*4/state/manifest.ocdbt is missing; step 3: .*; step 1: .*"):
    _restore(workdir)


@pytest.mark.slow
def test_training_resumes_past_a_corrupt_checkpoint_and_sets_it_aside(trained, tmp_path,
                                                                      caplog):
  workdir = _copy(trained, tmp_path)
  _flip_stored_array(workdir / "checkpoints" / "4" / "state")
  config = smoke.get_config()
  config.update(TRAINED_FIELDS)
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(config, str(workdir))
  assert "Checkpoint step 4" in caplog.text and "is corrupt" in caplog.text
  assert "resumed from step 3" in caplog.text
  assert (workdir / checkpoint.SET_ASIDE / "4.corrupt").is_dir()
  assert _same(_restore(workdir, 4).state, _restore(trained, 4).state)
  assert _metric_steps(workdir) == [1, 2, 3, 4]


# --- 7. every command's expected failures: one line, exit code 1 -----------------------------------

def test_main_fails_in_one_line_on_data_and_workdir_mistakes(tmp_path):
  empty = tmp_path / "empty"
  (empty / "train").mkdir(parents=True)
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  _fails_in_one_line(tmp_path / "w", "Fashion-MNIST directory not found",
                     data__data_dir="/nonexistent/fmnist")
  _fails_in_one_line(tmp_path / "w", "holds no .jpg/.jpeg/.png files",
                     data__source="folder", data__data_dir=str(empty))
  _fails_in_one_line(tmp_path / "w", "Unknown TFDS dataset 'no_such_dataset_xyz'",
                     data__source="tfds", data__name="no_such_dataset_xyz",
                     data__data_dir=str(tmp_path))
  _fails_in_one_line(blocker / "w", f"Cannot write to {blocker / 'w'}")


@pytest.mark.slow
def test_evaluation_commands_fail_in_one_line_without_a_run(tmp_path, trained):
  missing = tmp_path / "missing"
  no_checkpoints = tmp_path / "no_checkpoints"
  no_checkpoints.mkdir()
  shutil.copy(trained / "config.json", no_checkpoints / "config.json")
  image = tmp_path / "image.png"
  from PIL import Image
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
  cases = [
      ("sove_jax.evaluate.knn", (f"--workdir={missing}",), "does not exist"),
      ("sove_jax.evaluate.linear", (f"--workdir={no_checkpoints}",), "No checkpoints in"),
      ("sove_jax.evaluate.pca", (f"--workdir={missing}", f"--images={image}"), "does not exist"),
      ("sove_jax.evaluate.video", (f"--workdir={missing}", f"--data_dir={tmp_path}"),
       "a DAVIS-2017 folder?"),
      ("sove_jax.evaluate.retrieval", (f"--workdir={missing}", f"--data_dir={tmp_path}"),
       "gnd_roxford5k.pkl"),
  ]
  for module, args, words in cases:
    code, out, _ = _run(module, *args)
    _one_line_failure(code, out, words)
  assert not (no_checkpoints / "checkpoints").exists()  # evaluation creates nothing


@pytest.mark.slow
def test_weight_commands_fail_in_one_line(tmp_path, trained):
  module = "sove_jax.interop.torch_weights"
  code, out, _ = _run(module, "export", f"--workdir={tmp_path / 'missing'}",
                      f"--out={tmp_path / 'x.safetensors'}")
  _one_line_failure(code, out, "does not exist: it is not a sove_jax training workdir")
  random_bytes = tmp_path / "random.pth"
  random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
  code, out, _ = _run(module, "import", f"--checkpoint={random_bytes}")
  error = _one_line_failure(code, out, "is not a readable PyTorch file (corrupt")
  assert "trust" not in error  # never advise unpickling a corrupt file
  no_torch = ("-c", "import runpy, sys; sys.modules['torch'] = None; "
              "runpy.run_module('sove_jax.interop.torch_weights', run_name='__main__')")
  code, out, _ = _run(None, "import", f"--checkpoint={random_bytes}", prefix=no_torch)
  _one_line_failure(code, out, "needs PyTorch, which is not installed",
                    "pip install torch --index-url https://download.pytorch.org/whl/cpu")


# --- 8. records --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_and_resume_log_each_step_once(tmp_path):
  """A run killed (SIGKILL) with an asynchronous save in flight and steps logged that its last
  complete checkpoint does not hold: the restart resumes from the last complete checkpoint, takes
  those steps again, and metrics.jsonl holds each step once (the earlier lines move aside)."""
  workdir = tmp_path / "w"
  proc, _ = _run_until_step(workdir, 5, "--config.checkpoint_every=2")
  # metrics.jsonl is written in a background thread: kill as soon as it holds step 5, not after a
  # fixed wait (under load a fixed second let the run finish its step-6 checkpoint first).
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline and 5 not in _metric_steps_so_far(workdir):
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  logged = _metric_steps(workdir)
  complete = checkpoint.checkpoint_steps(workdir)
  assert 5 in logged
  assert complete and complete[-1] in (2, 4)
  code, out, _ = _main(workdir, "--config.total_steps=100000", "--config.run_steps=2")
  assert code == 0, out
  resumed = int(re.search(r"resumed from step (\d+)", out).group(1))
  assert resumed == complete[-1]
  assert max(logged) > resumed  # steps were logged that the resumed run takes again
  assert _metric_steps(workdir) == list(range(1, resumed + 3))


# --- issue: a workdir in a bucket ------------------------------------------------------------------

@pytest.mark.slow
def test_gs_workdir_trains_resumes_and_evaluates_on_a_fake_bucket(tmp_path):
  """--workdir=gs://bucket/run end to end: Orbax's arrays through tensorstore's GCS driver,
  everything else through epath, to a fake bucket (sove_jax/rehearsal/fake_gcs.py); nothing is
  written to a local path named after the URL."""
  from sove_jax.rehearsal import fake_gcs
  bucket = tmp_path / "bucket"
  (bucket / "bkt").mkdir(parents=True)
  cwd_before = set(os.listdir(ROOT))
  with fake_gcs.FakeGcsServer(bucket) as server:
    env = dict(os.environ, **server.env)
    boot = ("-m", "sove_jax.rehearsal.fake_gcs", str(bucket))

    def run(module, *args):
      code, out, _ = _run(None, module, *args, env=env, prefix=boot)
      assert code == 0, out
      return out

    out = run("sove_jax.main", SMOKE, "--workdir=gs://bkt/run", "--config.run_steps=2")
    assert "workdir gs://bkt/run" in out and "new run" in out
    out = run("sove_jax.main", SMOKE, "--workdir=gs://bkt/run")
    assert "resumed from step 2 of 4" in out
    out = run("sove_jax.evaluate.knn", "--workdir=gs://bkt/run", "--batch_size=16",
              "--max_train_examples=128", "--max_eval_examples=32")
    assert "k-NN top-1 (%)" in out
  run_dir = bucket / "bkt" / "run"
  assert checkpoint.checkpoint_steps(run_dir) == [2, 4]
  assert (run_dir / "checkpoints" / "4" / "state" / "manifest.ocdbt").is_file()
  assert _metric_steps(run_dir) == [1, 2, 3, 4]
  assert json.loads((run_dir / "knn.json").read_text())["step"] == 4
  assert checkpoint.read_config(run_dir).total_steps == 4
  logdirs = (bucket / fake_gcs.SUMMARY_LOG).read_text().split()
  assert logdirs == ["gs://bkt/run", "gs://bkt/run"]  # TensorBoard's writer got the URL as is
  assert set(os.listdir(ROOT)) == cwd_before  # no local "gs:" folder
