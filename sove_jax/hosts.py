"""What the hosts of a run agree on, and how long one waits for the others.

A pod's hosts see their own events: SIGTERM (a preemption notice) or Ctrl-C reaches some of them,
at different moments; one host's input can fail. Each host acting on its own event alone would
split the run (one host inside a collective save, the others inside the next step's collectives:
a hang). So every event becomes a flag that travels *in band*: each host writes its flags into
its rows of the next batch (`host_flags`, int32 per example: the flag bits above the process
index), the jitted step reduces them over the whole global batch with the step's own metrics
(`agreeing`), and the loop reads them with those metrics, one step later, as it already does.
Every host reads the same reduced value after the same step, so every host stops after the same
step: no extra collective, no extra host sync, and the same code on TPU, GPU and CPU (gloo).
A flag raised while batch s is built is acted upon after step s + 1 at the latest (s + 1 +
the device prefetch depth, when the feed builds batches ahead, `sove_jax/feed.py`).

JAX's own preemption notifier also learns of SIGTERM through a signal handler, which the handler
here replaces: sove_jax does not use it (its agreement is this one).

Nothing in band can help when a host dies (SIGKILL, a lost machine) or hangs: the others wait
inside a collective that never completes. `Watchdog` bounds that wait: when no step has finished
for `hosts.stall_timeout_s` (`hosts.slow_timeout_s` for start-up, saves and the k-NN monitor), it
asks every process, through the coordination service's key-value store, to say where it is; the
processes that do not answer within `hosts.answer_s` are named as lost in one line, and the
process exits (code 1) without waiting for the others at shutdown. JAX's heartbeat
(`hosts.heartbeat_timeout_s`, passed to `jax.distributed.initialize`) ends every process of a
job whose member stopped sending heartbeats; the watchdog's shorter timeout speaks first, so the
line names the lost process. A restart of every host resumes from the last complete checkpoint.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

SIGTERM = 1       # a host got SIGTERM (preemption) ...
SIGINT = 4        # ... or Ctrl-C: every host saves after the same step and exits 0
STOP = SIGTERM | SIGINT
INPUT_FAILED = 2  # a host's input raised: every host stops after the same step, exit 1
_BITS = (SIGTERM, INPUT_FAILED, SIGINT)
_SHIFT = 20       # a flag row: (bits << _SHIFT) | process index
_NO_PROCESS = 1 << _SHIFT
EXIT_LOST = 1     # the exit code of a process that gave up waiting for a lost one


class RunStopped(RuntimeError):
  """Every process stopped after the same step for a reason one of them had (its input failed);
  the message says which process and what is kept."""


# --- stop requests -------------------------------------------------------------------------------

class StopSignals:
  """SIGTERM and SIGINT (Ctrl-C) handlers: the first sets `reason` (the loop saves at the next
  step boundary, after every host agrees, and exits 0); a second Ctrl-C aborts at once
  (KeyboardInterrupt, no save). Installed from the main thread only (Python's rule)."""

  def __init__(self):
    self.reason: str | None = None   # "SIGTERM" or "SIGINT", the first received
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.reason is not None:
      if signum == signal.SIGINT:
        raise KeyboardInterrupt(f"second {name}: aborted without saving")
      return
    self.reason = name
    logging.warning("%s received: saving at the next step boundary every host agrees on, then "
                    "exiting%s.", name, " (Ctrl-C again aborts at once)"
                    if signum == signal.SIGINT else "")

  @property
  def bits(self) -> int:
    """This host's stop flag for the batch being built (0: none)."""
    return {"SIGTERM": SIGTERM, "SIGINT": SIGINT}.get(self.reason, 0)

  def restore(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


# --- the in-band agreement -----------------------------------------------------------------------

def flag_rows(bits: int, process_index: int, rows: int) -> np.ndarray:
  """This host's `host_flags` column: int32 [rows], every row `bits` above the process index."""
  if not 0 <= process_index < _NO_PROCESS:
    raise ValueError(f"process index {process_index} does not fit the host flags")
  return np.full((rows,), (int(bits) << _SHIFT) | process_index, np.int32)


def reduce_flags(flags: jax.Array) -> dict:
  """In the step: the global batch's flag rows -> "hosts/bits" (every host's bits, OR-ed),
  "hosts/flagged_rows" (rows with any bit: the flagged hosts times the per-host batch) and
  "hosts/first" (the lowest flagged process index; `_NO_PROCESS` when none)."""
  bits = flags >> _SHIFT
  process = flags & (_NO_PROCESS - 1)
  flagged = bits > 0
  # Each bit by a max (CPU collectives across processes reduce by sum, max, min, not OR).
  any_bits = sum(bit * jnp.max((bits & bit) != 0).astype(jnp.int32) for bit in _BITS)
  return {"hosts/bits": any_bits,
          "hosts/flagged_rows": jnp.sum(flagged, dtype=jnp.int32),
          "hosts/first": jnp.min(jnp.where(flagged, process, _NO_PROCESS))}


def agreeing(step_fn):
  """step(state, batch) -> (state, metrics) taking `batch["host_flags"]` too, and returning the
  reduced flags (`reduce_flags`) with its metrics; the wrapped step never sees the flags."""
  def step(state, batch):
    batch = dict(batch)
    flags = batch.pop("host_flags")
    state, metrics = step_fn(state, batch)
    return state, {**metrics, **reduce_flags(flags)}
  return step


class Agreed:
  """The reduced flags of one step, read on the host (`from_metrics` pops them)."""

  def __init__(self, bits: int, flagged_rows: int, first: int, rows_per_host: int):
    self.bits = int(bits)
    self.hosts = int(flagged_rows) // max(int(rows_per_host), 1)
    self.first = None if int(first) >= _NO_PROCESS else int(first)

  @classmethod
  def from_metrics(cls, metrics: dict, rows_per_host: int) -> "Agreed":
    return cls(metrics.pop("hosts/bits", 0), metrics.pop("hosts/flagged_rows", 0),
               metrics.pop("hosts/first", _NO_PROCESS), rows_per_host)

  def joined(self, later: "Agreed") -> "Agreed":
    """This agreement with a later step's: the bits of both, every flagged host counted once
    (the most at one step), the lowest process; the same on every host, as both are."""
    out = Agreed(self.bits | later.bits, 0, _NO_PROCESS, 1)
    out.hosts = max(self.hosts, later.hosts)
    firsts = [f for f in (self.first, later.first) if f is not None]
    out.first = min(firsts) if firsts else None
    return out

  @property
  def stop(self) -> bool:
    return bool(self.bits & STOP)

  @property
  def input_failed(self) -> bool:
    return bool(self.bits & INPUT_FAILED)

  def signals(self) -> str:
    """`SIGTERM`, `SIGINT` or `SIGTERM and SIGINT`: what the flagged hosts received."""
    return " and ".join(n for n, bit in (("SIGTERM", SIGTERM), ("SIGINT", SIGINT))
                        if self.bits & bit)

  def who(self) -> str:
    """`process 2` or `process 1 and 2 others`."""
    others = self.hosts - 1
    return f"process {self.first}" + (f" and {others} other{'s' * (others > 1)}" if others > 0
                                      else "")


# --- lost hosts ----------------------------------------------------------------------------------

_STUCK = "sove_jax/stuck/"  # process -> where it is, written when some process is stuck
_LOST = "sove_jax/lost"     # the first roll call's verdict: the lost processes, comma-separated
_DONE = "sove_jax/done/"    # process -> its line is out


def _client():
  """The coordination service's client of `jax.distributed` (JAX keeps it in a private module;
  Orbax reaches its barriers the same way); None in a single-process run."""
  from jax._src import distributed
  return distributed.global_state.client


def _with_deadline(fn, seconds: float):
  """fn() in a daemon thread, given up after `seconds` (a call to a dead coordinator may block):
  (True, result), (False, exception) or (None, None) when it did not return in time."""
  out = []

  def target():
    try:
      out.append((True, fn()))
    except Exception as e:  # noqa: BLE001  reported by the caller
      out.append((False, e))
  thread = threading.Thread(target=target, daemon=True, name="sove_jax-kv")
  thread.start()
  thread.join(seconds)
  return out[0] if out else (None, None)


def _entries(client, prefix: str, seconds: float = 5) -> dict | None:
  """{key: value} under `prefix` in the key-value store; None when the store does not answer."""
  ok, entries = _with_deadline(lambda: client.key_value_dir_get(prefix), seconds)
  return dict(entries) if ok else None


def _put(client, key: str, value: str, seconds: float = 5) -> bool:
  # Overwrite: a process's watchdog may have answered another's roll call already.
  ok, error = _with_deadline(lambda: client.key_value_set(key, value, allow_overwrite=True),
                             seconds)
  if ok is False:
    logging.warning("The coordination service refused key %s (%s).", key, error)
  return bool(ok)


def roll_call(where: str, answer_s: float, process_index: int | None = None,
              process_count: int | None = None, client=None) -> tuple[list[int] | None, dict]:
  """Writes `where` under this process's key and waits up to `answer_s` for every process to
  write its own (each process's watchdog answers, stuck or not). Returns (the processes that did
  not answer, {process: what it said}); (None, {}) when the coordination service itself does not
  answer (process 0, which hosts it, is gone). A verdict another process already reached is
  taken as it is (every process names the same lost ones)."""
  p = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  client = client or _client()
  if not _put(client, _STUCK + str(p), where, min(answer_s, 10)):
    return None, {}
  deadline = time.monotonic() + answer_s
  while True:
    entries = _entries(client, "sove_jax/", min(answer_s, 10))
    if entries is None:
      return None, {}
    said = {int(k.rsplit("/", 1)[1]): v for k, v in entries.items() if k.startswith(_STUCK)}
    if _LOST in entries:
      return _parse(entries[_LOST]), said
    if len(said) >= n or time.monotonic() > deadline:
      lost = sorted(set(range(n)) - set(said))
      _put(client, _LOST, ",".join(map(str, lost)))
      return lost, said
    time.sleep(0.25)


def _parse(verdict: str) -> list[int]:
  return [int(x) for x in verdict.split(",") if x]


def leave(line: str, process_index: int, said: dict, answer_s: float, client=None,
          give_up_fn=None):
  """Says `line`, marks this process done, and ends it: process 0 last (it hosts the
  coordination service the others still need to reach the same verdict and say their lines),
  after every process that answered the roll call is done or `2 * answer_s` passed."""
  client = client or _client()
  logging.error("%s", line)
  _put(client, _DONE + str(process_index), "1")
  if process_index == 0:
    deadline = time.monotonic() + 2 * answer_s
    while time.monotonic() < deadline:
      done = _entries(client, _DONE)
      if done is None or len(done) >= len(said):
        break
      time.sleep(0.25)
  (give_up_fn or give_up)(line)


def lost_line(lost: list[int] | None, said: dict, process_index: int, cause: str,
              answer_s: float) -> str:
  """The one line a process prints before it gives up on the others: who is lost first."""
  restart = "every process exits; restart all of them to resume from the last complete checkpoint."
  if lost is None:
    return (f"Lost process 0: the coordination service it hosts does not answer; on process "
            f"{process_index}: {cause}; {restart}")
  if not lost:
    return (f"No process is lost (all answered: " + "; ".join(
        f"{p} {said[p]}" for p in sorted(said)) + f"); on process {process_index}: {cause}; "
        + restart)
  names = ", ".join(map(str, lost))
  return (f"Lost process{'es' if len(lost) > 1 else ''} {names} (killed, hung or unreachable: "
          f"no answer within {answer_s:g} s); on process {process_index}: {cause}; {restart}")


def give_up(line: str, code: int = EXIT_LOST):
  """Ends this process now, its line said: the normal exit would wait at JAX's shutdown barrier
  for processes that will never reach it."""
  del line
  logging.flush()
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  os._exit(code)


class Watchdog:
  """Bounds every wait of a multi-process run (see the module docstring).

  The loop calls `beat(step, slow=...)` whenever it makes progress: a step done (`slow=False`:
  the next must come within `stall_timeout_s`) or a slow phase begun (start-up, a save, the k-NN
  monitor: `slow_timeout_s`). A daemon thread checks once a second: it answers another process's
  roll call with where this one is (so that only the lost are named), gives up with the others
  once one of them has named a lost process, and calls the roll itself when stalled.
  """

  def __init__(self, hosts_config, *, process_index: int | None = None,
               process_count: int | None = None, client=None, give_up_fn=give_up):
    self.config = hosts_config
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    self._client = client
    self._give_up = give_up_fn
    self._lock = threading.Lock()
    self._step, self._phase = 0, "start-up"
    self._since = time.monotonic()
    self._budget = float(hosts_config.slow_timeout_s)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True, name="sove_jax-watchdog")
    self._thread.start()

  def beat(self, step: int, phase: str = "step", slow: bool = False):
    with self._lock:
      self._step, self._phase = int(step), phase
      self._since = time.monotonic()
      self._budget = float(self.config.slow_timeout_s if slow else self.config.stall_timeout_s)

  def where(self) -> str:
    with self._lock:
      return f"step {self._step}, {self._phase}, {time.monotonic() - self._since:.0f} s"

  def close(self):
    self._stop.set()
    self._thread.join(5)

  def _leave(self, lost, said, cause):
    answer_s = float(self.config.answer_s)
    leave(lost_line(lost, said, self.process_index, cause, answer_s), self.process_index, said,
          answer_s, self._client or _client(), self._give_up)

  def _watch(self):
    client = self._client or _client()
    mine = _STUCK + str(self.process_index)
    while not self._stop.wait(1.0):
      with self._lock:
        waited, budget = time.monotonic() - self._since, self._budget
        step, phase = self._step, self._phase
      if waited > budget:
        lost, said = roll_call(f"stuck at {self.where()}", float(self.config.answer_s),
                               self.process_index, self.process_count, client)
        self._leave(lost, said, f"no progress for {waited:.0f} s (limit {budget:.0f} s) at "
                                f"step {step}, {phase}")
        return
      entries = _entries(client, "sove_jax/")
      if not entries:
        continue
      if _LOST in entries:  # another process named the lost ones: say it too, and leave
        said = {int(k.rsplit("/", 1)[1]): v for k, v in entries.items() if k.startswith(_STUCK)}
        self._leave(_parse(entries[_LOST]), said, f"waiting at {self.where()}")
        return
      if any(k.startswith(_STUCK) for k in entries) and mine not in entries:
        _put(client, mine, f"alive at {self.where()}")


def abandon(error: BaseException, process_index: int, process_count: int, answer_s: float):
  """An unexpected failure inside the loop of a multi-process run (a collective that failed
  because a peer died, say): names the processes that do not answer, then ends this one."""
  from sove_jax import checkpoint
  client = _client()
  lost, said = roll_call(f"failed: {checkpoint.cause(error, 120)}", answer_s, process_index,
                         process_count, client)
  leave(lost_line(lost, said, process_index, checkpoint.cause(error, 200), answer_s),
        process_index, said, answer_s, client)
