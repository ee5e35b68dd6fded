r"""The pod rehearsal: a multi-host run on this machine, the faults a pod meets, and a table.

    python -m sove_jax.rehearsal [--out=DIR] [--processes=4] [--devices_per_process=2] \
        [--faults=stop,hang,kill,input]

Every process is `python -m sove_jax.main --config=configs/rehearsal.py` as on a pod's workers
(jax.distributed over a localhost coordinator; CPU collectives over gloo), each with its own fake
CPU devices (an 8-device mesh: FSDP 2 x data 4), reading a synthetic ImageNet-shaped JPEG set
written first (one file corrupt, so the hosts' input positions differ), the workdir in a fake
bucket (gs://rehearsal/..., `fake_gcs`). Then:

1. reference: an uninterrupted run to the last step.
2. stop: the same run in another workdir; SIGTERM to one host, Ctrl-C (SIGINT) to another a step
   later. Every host must save the same step and exit 0.
3. restart, hang: every host restarted; once it has resumed and taken a few steps, SIGSTOP to one
   host (alive, silent). Every other host must exit (code 1) within the bound of
   configs/rehearsal.py's `hosts` block, its line naming the hung process; the rehearsal then
   kills the hung one, as an operator would.
4. restart, kill: the same with SIGKILL.
5. restart: every host restarted; it resumes from the last complete checkpoint and trains to the
   end.
6. input failure: a new run in which one host's data folder holds only corrupt files: every host
   must stop after the same step, exit 1, that host naming its failure, the others naming it.
`--faults` leaves out 3 or 6 (1, 2, 4 and 5 always run). The final checkpoint of 5 must equal
1's bit for bit (the checksums saved with every checkpoint:
32-bit word sums of every array, the banks, optimizer state and random key included), though
the hosts' input positions differ (one file of the set is corrupt) and were each restored.

It prints one table row per host and fault (what the host did, its exit code, how long it took)
and exits 1 if any expectation failed. Every wait is bounded: a launch that overruns is ended with
SIGKILL and reported.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app, flags

from sove_jax.rehearsal import fake_gcs

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "rehearsal.py"
BUCKET = "rehearsal"
_STEP = re.compile(r"\bstep +(\d+)/(\d+) \|")
# XLA's CPU backend with LLVM's costly passes off: the step compiles about 1.7x faster (20.6 s ->
# 11.9 s in one process here) and its tiny steps run no slower that matters. Compilation is most
# of a launch's time: JAX's persistent cache is written by process 0 only, and in the
# rehearsal's logs process 0, its step loaded from the cache in 11-17 s, still waits about 90 s
# at the barrier for the others to compile theirs. The flags are the same in every launch, so
# the bitwise comparison holds.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


# --- the data ------------------------------------------------------------------------------------

def write_jpegs(root: pathlib.Path, num_images: int, num_classes: int = 8, seed: int = 0,
                corrupt_all: bool = False) -> int:
  """An ImageNet-shaped JPEG folder (root/train/<class>/*.jpg): sizes around 500 x 375, some
  smaller and some larger than the 64 px canvas by far, smooth textured content; one file
  corrupt (a decoder sees a truncated JPEG), or every one. Returns the number of readable
  images."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  for i in range(num_images):
    folder = root / "train" / f"class_{i % num_classes:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    scale = rng.choice([0.4, 1.0, 1.0, 1.0, 1.6])
    h, w = (np.array([375, 500]) * scale * rng.uniform(0.8, 1.2, 2)).astype(int)
    if rng.random() < 0.5:
      h, w = w, h
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    noise = rng.integers(-20, 21, (h, w, 3))
    pixels = np.clip(np.asarray(image, np.int32) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
  files = sorted((root / "train").glob("*/*.jpg"))
  for corrupt in (files if corrupt_all else [files[num_images // 3]]):
    corrupt.write_bytes(corrupt.read_bytes()[:200])
  return 0 if corrupt_all else num_images - 1


# --- processes -----------------------------------------------------------------------------------

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class Host:
  """One process of a launch: its output read line by line (timestamped) into a log file."""

  def __init__(self, index: int, cmd: list, env: dict, log: pathlib.Path):
    self.index, self.log = index, log
    self.lines: list[tuple[float, str]] = []
    self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
    self.started = time.monotonic()
    self.signalled: tuple[str, float] | None = None
    self.ended: float | None = None
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    with open(self.log, "w") as f:
      for line in self.proc.stdout:
        self.lines.append((time.monotonic(), line.rstrip("\n")))
        f.write(line)
        f.flush()
    self.proc.wait()
    self.ended = time.monotonic()

  def send(self, signum):
    self.signalled = (signal.Signals(signum).name, time.monotonic())
    self.proc.send_signal(signum)

  def last_line(self, *needles) -> str:
    """The last line holding any of `needles` (the outcome a host reports)."""
    for _, line in reversed(self.lines):
      if any(n in line for n in needles):
        return re.sub(r"^\d\d:\d\d:\d\d (ERROR \S+\] )?", "", line)
    return ""


class Launch:
  """All processes of one start of the run, each `python -m sove_jax.main` in the fake bucket."""

  def __init__(self, name: str, out: pathlib.Path, bucket_root: pathlib.Path, server_env: dict,
               workdir: str, num_processes: int, devices: int, overrides: list,
               per_process: dict | None = None):
    self.name = name
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(server_env, JAX_PLATFORMS="cpu", SOVE_JAX_ALLOCATOR="system",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}",
               TF_CPP_MIN_LOG_LEVEL="2",
               JAX_COMPILATION_CACHE_DIR=str(out / "xla_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"\W+", "_", name).strip("_")
    self.hosts = [Host(i, [sys.executable, "-m", "sove_jax.rehearsal.fake_gcs", str(bucket_root),
                           "sove_jax.main", f"--config={CONFIG}", f"--workdir={workdir}",
                           f"--coordinator_address=localhost:{port}",
                           f"--num_processes={num_processes}", f"--process_id={i}", *overrides,
                           *(per_process or {}).get(i, [])],
                       env, logs / f"{slug}.process{i}.log")
                  for i in range(num_processes)]

  def step(self) -> int:
    """The last step process 0 logged (0 before the first)."""
    for _, line in reversed(self.hosts[0].lines):
      m = _STEP.search(line)
      if m:
        return int(m.group(1))
    return 0

  def wait_until(self, predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if predicate():
        return True
      if all(h.ended is not None for h in self.hosts):
        return bool(predicate())
      time.sleep(0.1)
    return False

  def finish(self, timeout: float) -> bool:
    """Waits for every process; after `timeout` kills the rest (SIGKILL) and says False."""
    ok = self.wait_until(lambda: all(h.ended is not None for h in self.hosts), timeout)
    for h in self.hosts:
      if h.ended is None:
        h.proc.kill()
    for h in self.hosts:
      h._reader.join(30)
    return ok


# --- the rehearsal -------------------------------------------------------------------------------

class Report:
  def __init__(self):
    self.rows, self.failures = [], []

  def row(self, fault: str, host: Host, did: str, start: float):
    took = (host.ended or time.monotonic()) - start
    self.rows.append((fault, host.index, did, host.proc.returncode, f"{took:.1f} s"))

  def expect(self, ok: bool, what: str):
    if not ok:
      self.failures.append(what)
    return ok

  def table(self) -> str:
    head = ("| fault | process | what it did | exit code | time |\n"
            "|---|---|---|---|---|\n")
    return head + "\n".join(f"| {f} | {p} | {d} | {c} | {t} |" for f, p, d, c, t in self.rows)


def _checksums(bucket_root: pathlib.Path, workdir: str, step: int) -> dict:
  path = bucket_root / workdir.removeprefix("gs://") / "checkpoints" / str(step) / "checksums"
  return json.loads((path / "metadata").read_text())["arrays"]


def _steps(bucket_root: pathlib.Path, workdir: str) -> list[int]:
  folder = bucket_root / workdir.removeprefix("gs://") / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


FAULTS = ("stop", "hang", "kill", "input")


def rehearse(out: pathlib.Path, *, processes: int = 4, devices: int = 2, images: int = 160,
             steps: int = 24, timeout: float = 900, faults=FAULTS, say=print) -> Report:
  """Runs the launches of the module docstring; returns the report (failures listed). `faults`
  picks which of 2 ("stop"), 3 ("hang"), 4 ("kill") and 6 ("input") run; the reference, the
  restart to the end and the bitwise comparison always do, and need "stop" and "kill"."""
  if set(faults) - set(FAULTS) or not {"stop", "kill"} <= set(faults):
    raise ValueError(f"faults={','.join(faults)}: each must be one of {', '.join(FAULTS)}, and "
                     "stop and kill are always needed (the restarts resume after them).")
  out.mkdir(parents=True, exist_ok=True)
  data = out / "data"
  if not (data / "train").exists():
    write_jpegs(data, images)
  bucket = out / "bucket"
  (bucket / BUCKET).mkdir(parents=True, exist_ok=True)
  report = Report()
  overrides = [f"--config.data.data_dir={data}", f"--config.total_steps={steps}"]
  with fake_gcs.FakeGcsServer(bucket) as server:
    def launch(name, workdir, per_process=None):
      say(f"rehearsal: {name} ({processes} processes x {devices} devices, {workdir})")
      return Launch(name, out, bucket, server.env, workdir, processes, devices, overrides,
                    per_process)

    reference, faulted = f"gs://{BUCKET}/reference", f"gs://{BUCKET}/faulted"
    # 1. The uninterrupted run.
    run = launch("reference", reference)
    t0 = time.monotonic()
    finished = run.finish(timeout)
    for h in run.hosts:
      report.row("none (reference run)", h, h.last_line("trained to step", "Lost", "ERROR")
                 or "?", t0)
    report.expect(finished and all(h.proc.returncode == 0 for h in run.hosts),
                  "the reference run did not end with exit code 0 on every process")

    # 2. SIGTERM to one host, SIGINT to another a step later.
    term, interrupt = 1 % processes, (processes - 1)
    run = launch("SIGTERM + SIGINT", faulted)
    t0 = time.monotonic()
    at = max(3, steps // 4)
    if run.wait_until(lambda: run.step() >= at, timeout):
      run.hosts[term].send(signal.SIGTERM)
      t0 = run.hosts[term].signalled[1]
      run.wait_until(lambda: run.step() >= at + 1, 120)
      run.hosts[interrupt].send(signal.SIGINT)
    finished = run.finish(timeout)
    saved = set()
    for h in run.hosts:
      line = h.last_line("stopped (", "Lost", "ERROR")
      m = re.search(r"saved step (\d+)", line)
      if m:
        saved.add(int(m.group(1)))
      got = (f" ({h.signalled[0]} at step {at if h.index == term else at + 1})"
             if h.signalled else "")
      report.row(f"SIGTERM to process {term}, SIGINT to process {interrupt}", h,
                 (line or "?") + got, t0)
    report.expect(finished and all(h.proc.returncode == 0 for h in run.hosts),
                  "after SIGTERM/SIGINT not every process exited 0")
    report.expect(len(saved) == 1 and len(run.hosts) == sum(
        "saved step" in h.last_line("saved step") for h in run.hosts),
                  f"the processes did not all save the same step: {sorted(saved)}")
    stopped_at = min(saved) if saved else None

    # 3. Restart; SIGSTOP to one host (it hangs: alive, silent) after a few steps.
    if "hang" in faults:
      _lose_a_host(launch("restart, then SIGSTOP", faulted), 3 % processes, signal.SIGSTOP,
                   (stopped_at or 0) + 2, timeout, report)
    # 4. Restart; SIGKILL to one host after a few steps.
    _lose_a_host(launch("restart, then SIGKILL", faulted), 2 % processes, signal.SIGKILL,
                 (stopped_at or 0) + 3, timeout, report)

    # 5. Restart to the end.
    checkpoints = _steps(bucket, faulted)
    run = launch("restart to the end", faulted)
    t0 = time.monotonic()
    finished = run.finish(timeout)
    for h in run.hosts:
      report.row("restart after the kill", h, h.last_line("resumed from step") + "; "
                 + h.last_line("trained to step", "ERROR", "Lost"), t0)
    report.expect(finished and all(h.proc.returncode == 0 for h in run.hosts),
                  "the last restart did not end with exit code 0 on every process")
    report.expect(f"resumed from step {checkpoints[-1] if checkpoints else '?'} " in
                  run.hosts[0].last_line("resumed from step") + " ",
                  f"the restart did not resume from the last complete checkpoint "
                  f"({checkpoints[-1:]})")
    # 6. One host's input yields nothing (its data folder's every file corrupt).
    if "input" in faults:
      bad = 1 % processes
      corrupt = out / "corrupt_data"
      if not (corrupt / "train").exists():
        write_jpegs(corrupt, images // processes, corrupt_all=True)
      run = launch("input failure", f"gs://{BUCKET}/bad_input",
                   {bad: [f"--config.data.data_dir={corrupt}"]})
      t0 = time.monotonic()
      finished = run.finish(timeout)
      for h in run.hosts:
        line = h.last_line("input of process", "Lost", "ERROR", "trained to step")
        report.row(f"every file of process {bad}'s data corrupt", h, line or "?", t0)
        mine = h.index == bad
        report.expect(h.proc.returncode == 1 and (
            f"The input of process {bad} failed: " in line if mine else
            f"The input of process {bad} failed (its log says why)" in line),
                      f"process {h.index} did not stop in one line naming process {bad}'s input")
      report.expect(finished, "the input-failure launch did not end")
  try:
    same = _checksums(bucket, reference, steps) == _checksums(bucket, faulted, steps)
  except OSError as e:
    same = False
    report.failures.append(f"final checkpoints missing: {e}")
  report.expect(same, "the interrupted run did not end in the uninterrupted run's state")
  report.rows.append(("end state", "all", "faulted run's step-%d checkpoint %s the reference's, "
                      "bit for bit" % (steps, "equals" if same else "DIFFERS FROM"), "", ""))
  return report


def _lose_a_host(run: Launch, lost: int, signum, at_step: int, timeout: float,
                 report: Report):
  """Once the restarted `run` has resumed and reached `at_step`, sends `signum` to host `lost`
  (SIGSTOP: it hangs, alive and silent; SIGKILL: it is gone). Every other host must exit 1 within
  the hosts block's bound, its line naming process `lost`; a hung host is then killed by hand,
  as an operator would."""
  hang = signum == signal.SIGSTOP
  fault = "SIGSTOP to a host (it hangs)" if hang else "SIGKILL to a host"
  t0 = time.monotonic()
  resumed = run.wait_until(lambda: any("resumed from step" in l for _, l in run.hosts[0].lines),
                           timeout)
  signalled = None
  if resumed and run.wait_until(lambda: run.step() >= at_step, timeout):
    run.hosts[lost].send(signum)
    signalled = run.hosts[lost].signalled[1]
  others_done = run.wait_until(
      lambda: all(h.ended is not None for h in run.hosts if h.index != lost), timeout)
  if hang:
    run.hosts[lost].proc.kill()
  finished = run.finish(60 if hang else timeout)
  for h in run.hosts:
    if h.index == lost:
      report.row(fault, h, f"hung (SIGSTOP at step {at_step}), then killed by the rehearsal"
                 if hang else f"killed (SIGKILL at step {at_step})", t0)
      continue
    line = h.last_line("Lost process", "ERROR", "stopped (")
    report.row(fault, h, line or "?", signalled or t0)
    report.expect(h.proc.returncode == 1 and f"Lost process {lost} " in line,
                  f"process {h.index} did not exit 1 naming process {lost} as lost")
  bound = _bound()
  slowest = max(((h.ended or 0) - (signalled or 0)) for h in run.hosts if h.index != lost)
  report.expect(others_done and finished and signalled is not None and slowest <= bound,
                f"the others took {slowest:.0f} s to exit after the {'hang' if hang else 'kill'}"
                f" (bound {bound:.0f} s)")


def _bound() -> float:
  """How long the others may take to exit after a host is killed: the watchdog's stall timeout
  and roll call, plus time to print and exit (configs/rehearsal.py's hosts block)."""
  from sove_jax import configuration
  h = configuration.load(str(CONFIG)).hosts
  return h.stall_timeout_s + h.answer_s + 15


_OUT = flags.DEFINE_string("out", "runs/rehearsal", "Where the data, the fake bucket, the logs "
                           "and the table go.")
_PROCESSES = flags.DEFINE_integer("processes", 4, "Processes (hosts).")
_DEVICES = flags.DEFINE_integer("devices_per_process", 2, "Fake CPU devices per process.")
_STEPS = flags.DEFINE_integer("steps", 24, "Steps of the run.")
_IMAGES = flags.DEFINE_integer("images", 160, "JPEGs in the synthetic set.")
_TIMEOUT = flags.DEFINE_float("timeout", 900, "Longest wait for one launch, seconds.")
_FAULTS = flags.DEFINE_list("faults", list(FAULTS), "Which faults to rehearse (stop and kill "
                            "always; the test suite runs only those two).")


def main(argv):
  del argv
  out = pathlib.Path(_OUT.value).absolute()
  report = rehearse(out, processes=_PROCESSES.value, devices=_DEVICES.value,
                    images=_IMAGES.value, steps=_STEPS.value, timeout=_TIMEOUT.value,
                    faults=tuple(_FAULTS.value))
  table = report.table()
  (out / "table.md").write_text(table + "\n")
  print(table)
  if report.failures:
    print("\nFAILED: " + "; ".join(report.failures))
    sys.exit(1)
  print(f"\nEvery expectation held; logs in {out / 'logs'}.")


if __name__ == "__main__":
  app.run(main)
