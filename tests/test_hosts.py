"""What the hosts agree on (in-band flags), how a stop is asked for, and how long one waits.

The multi-process behaviour end to end (four processes, SIGTERM, SIGINT, SIGKILL) is the pod
rehearsal's (tests/test_rehearsal.py); here each piece is checked in this process, the
coordination service replaced by a dictionary with its key-value calls.
"""
import os
import signal
import threading
import time

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from sove_jax import feed as feed_lib
from sove_jax import hosts


def _flags(per_process_bits, rows):
  return np.concatenate([hosts.flag_rows(bits, p, rows) for p, bits in
                         enumerate(per_process_bits)])


def _reference(per_process_bits):
  """What the step must report: OR of the bits, how many processes are flagged, the first."""
  flagged = [p for p, bits in enumerate(per_process_bits) if bits]
  bits = 0
  for b in per_process_bits:
    bits |= b
  return bits, len(flagged), (flagged[0] if flagged else None)


@pytest.mark.parametrize("per_process_bits", [
    (0, 0, 0, 0),
    (0, hosts.SIGTERM, 0, 0),
    (0, hosts.SIGTERM, 0, hosts.SIGINT),
    (hosts.INPUT_FAILED, 0, hosts.SIGTERM, 0),
    (hosts.SIGTERM | hosts.INPUT_FAILED, hosts.SIGINT, hosts.SIGTERM, hosts.SIGTERM),
])
def test_every_host_reads_the_same_reduced_flags_from_the_sharded_batch(per_process_bits):
  rows = 4  # per process; 4 "processes" x 4 rows over 8 devices
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  sharded = jax.device_put(_flags(per_process_bits, rows),
                           jax.NamedSharding(mesh, jax.P("data")))
  reduced = jax.device_get(jax.jit(hosts.reduce_flags)(sharded))
  agreed = hosts.Agreed.from_metrics(dict(reduced), rows_per_host=rows)
  want_bits, want_count, want_first = _reference(per_process_bits)
  assert (agreed.bits, agreed.hosts, agreed.first) == (want_bits, want_count, want_first)
  assert agreed.stop == bool(want_bits & hosts.STOP)
  assert agreed.input_failed == bool(want_bits & hosts.INPUT_FAILED)
  if want_first is not None:
    assert agreed.who().startswith(f"process {want_first}")


def test_the_agreeing_step_hides_the_flags_from_the_step_and_returns_them_reduced():
  seen = {}

  def step(state, batch):
    seen.update(batch)
    return state + 1, {"loss": batch["x"].sum()}

  state, metrics = jax.jit(hosts.agreeing(step))(
      0, {"x": np.ones(8, np.float32), "host_flags": _flags((0, hosts.SIGINT), 4)})
  assert set(seen) == {"x"}
  assert int(state) == 1 and float(metrics["loss"]) == 8
  assert int(metrics["hosts/bits"]) == hosts.SIGINT and int(metrics["hosts/first"]) == 1


def test_a_first_signal_asks_to_stop_and_a_second_ctrl_c_aborts():
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  signals = hosts.StopSignals()
  try:
    assert signals.reason is None and signals.bits == 0
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    assert signals.reason == "SIGTERM" and signals.bits == hosts.SIGTERM
    os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM changes nothing
    time.sleep(0.05)
    assert signals.reason == "SIGTERM"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.5)
  finally:
    signals.restore()
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
  first_ctrl_c = hosts.StopSignals()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)
    assert first_ctrl_c.reason == "SIGINT" and first_ctrl_c.bits == hosts.SIGINT
  finally:
    first_ctrl_c.restore()


class FakeCoordinator:
  """The key-value calls of jax.distributed's client, on a dictionary shared by threads."""

  def __init__(self):
    self.store, self.lock = {}, threading.Lock()

  def key_value_set(self, key, value, allow_overwrite=False):
    with self.lock:
      if key in self.store and not allow_overwrite:
        raise RuntimeError(f"ALREADY_EXISTS: {key}")
      self.store[key] = value

  def key_value_dir_get(self, prefix):
    with self.lock:
      return [(k, v) for k, v in sorted(self.store.items()) if k.startswith(prefix)]


class DeadCoordinator:
  def key_value_set(self, key, value, allow_overwrite=False):
    time.sleep(60)

  def key_value_dir_get(self, key):
    time.sleep(60)


def test_a_roll_call_names_the_processes_that_do_not_answer():
  kv = FakeCoordinator()
  kv.key_value_set("sove_jax/stuck/2", "alive at step 7")
  kv.key_value_set("sove_jax/stuck/0", "alive at step 7")  # answered another's roll call first
  lost, said = hosts.roll_call("stuck at step 7", 0.5, process_index=0, process_count=4,
                               client=kv)
  assert lost == [1, 3] and set(said) == {0, 2}
  line = hosts.lost_line(lost, said, 0, "no progress for 91 s", 0.5)
  assert line.startswith("Lost processes 1, 3 (killed, hung or unreachable")
  assert "restart all of them" in line and "\n" not in line
  t0 = time.monotonic()
  lost, _ = hosts.roll_call("stuck", 2, process_index=1, process_count=2,
                            client=DeadCoordinator())
  assert lost is None and time.monotonic() - t0 < 5  # a dead coordinator is not waited for
  assert hosts.lost_line(None, {}, 1, "x", 2).startswith("Lost process 0:")


def _hosts_config(stall, answer_s=1.5):
  return ConfigDict(dict(stall_timeout_s=stall, slow_timeout_s=60.0, answer_s=answer_s,
                         heartbeat_timeout_s=100.0, shutdown_timeout_s=10.0))


def test_the_watchdog_names_the_lost_process_and_every_other_says_it_too():
  """Process 0 stalls and calls the roll; process 1, still working, answers, then takes the
  verdict and leaves too; process 2 never answers (the lost one). Process 0 leaves last.

  Both watchdogs poll once a second, and process 0 waits at most `2 * answer_s` for process 1 to
  be done: `answer_s` is 6 s so that a loaded CI machine (where a 3 s window once ran out and
  process 0 left first) still orders them; an unloaded run still takes about `answer_s`."""
  kv = FakeCoordinator()
  lines, order = {}, []
  everyone_out = threading.Event()

  def give_up_as(p):
    def give_up(line):
      lines[p] = line
      order.append(p)
      if len(lines) == 2:
        everyone_out.set()
    return give_up

  config = _hosts_config(1.0, answer_s=6.0)
  stuck = hosts.Watchdog(config, process_index=0, process_count=3, client=kv,
                         give_up_fn=give_up_as(0))
  working = hosts.Watchdog(config, process_index=1, process_count=3, client=kv,
                           give_up_fn=give_up_as(1))
  stuck.beat(5)
  try:
    deadline = time.monotonic() + 60
    while not everyone_out.is_set() and time.monotonic() < deadline:
      if 1 not in lines:
        working.beat(6)  # process 1 keeps making progress until it hears the verdict
      time.sleep(0.2)
  finally:
    stuck.close()
    working.close()
  assert everyone_out.is_set(), f"not every process gave up: {lines}"
  assert order == [1, 0]  # process 0 hosts the coordination service: it leaves last
  for p, line in lines.items():
    assert line.startswith("Lost process 2 (killed, hung or unreachable"), line
    assert "\n" not in line
  assert "no progress for" in lines[0] and "at step 5" in lines[0]
  assert "waiting at step 6" in lines[1]
  assert kv.store["sove_jax/lost"] == "2"
  assert kv.store["sove_jax/stuck/1"].startswith("alive at step 6")


class FakeInput:
  """Host batches numbered from 0; raises at batch `fail_at`."""

  def __init__(self, rows=4, fail_at=None):
    self.rows, self.fail_at, self.position = rows, fail_at, 0

  def __next__(self):
    if self.position == self.fail_at:
      raise ValueError("every file of the split failed to decode")
    batch = {"x": np.full((self.rows, 3), self.position, np.float32),
             "label": np.arange(self.rows, dtype=np.int32) + 100 * self.position}
    self.position += 1
    return batch

  def get_state(self):
    return {"epoch": 0, "position": self.position}


def _sharding():
  return jax.NamedSharding(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]),
                           jax.P("data"))


SHAPES = {"x": ((4, 3), np.float32), "label": ((4,), np.int32)}


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_the_feed_builds_ahead_the_same_batches_each_with_the_position_after_it(depth):
  feed = feed_lib.Feed(FakeInput(), _sharding(), depth=depth, local_shapes=SHAPES,
                       process_index=3)
  try:
    items = [next(feed) for _ in range(5)]
  finally:
    feed.close()
  for n, item in enumerate(items):
    assert isinstance(item.batch["x"], jax.Array)
    np.testing.assert_array_equal(np.asarray(item.batch["x"]), np.full((4, 3), n))
    assert item.input_state == {"epoch": 0, "position": n + 1}
    np.testing.assert_array_equal(np.asarray(item.batch["host_flags"]),
                                  hosts.flag_rows(0, 3, 4))


@pytest.mark.parametrize("depth", [0, 2])
def test_a_failed_input_is_flagged_with_zeros_in_several_processes_and_raised_in_one(depth):
  feed = feed_lib.Feed(FakeInput(fail_at=2), _sharding(), depth=depth, local_shapes=SHAPES,
                       process_index=1)
  try:
    items = [next(feed) for _ in range(4)]
  finally:
    feed.close()
  assert [item.bits for item in items] == [0, 0, hosts.INPUT_FAILED, hosts.INPUT_FAILED]
  assert "failed to decode" in str(feed.error)
  for item in items[2:]:
    assert not np.asarray(item.batch["x"]).any()
    assert item.input_state == {"epoch": 0, "position": 2}
    assert item.batch["x"].shape == (4, 3) and item.batch["label"].dtype == np.int32
  alone = feed_lib.Feed(FakeInput(fail_at=1), _sharding(), depth=depth, local_shapes=SHAPES,
                        raise_input_errors=True)
  try:
    next(alone)
    with pytest.raises(ValueError, match="failed to decode"):
      next(alone)
  finally:
    alone.close()


def test_a_stop_signal_travels_in_the_next_batch_built():
  signals = hosts.StopSignals()
  feed = feed_lib.Feed(FakeInput(), _sharding(), depth=0, local_shapes=SHAPES,
                       stop_signals=signals, process_index=2)
  try:
    assert next(feed).bits == 0
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    item = next(feed)
    assert item.bits == hosts.SIGTERM
    np.testing.assert_array_equal(np.asarray(item.batch["host_flags"]),
                                  hosts.flag_rows(hosts.SIGTERM, 2, 4))
  finally:
    feed.close()
    signals.restore()


def test_agreements_of_successive_steps_join_every_hosts_flags():
  first = hosts.Agreed(hosts.SIGTERM, 4, 1, rows_per_host=4)     # process 1, SIGTERM
  later = hosts.Agreed(hosts.SIGINT | hosts.SIGTERM, 8, 1, 4)    # and process 3, Ctrl-C
  none = hosts.Agreed(0, 0, 1 << 20, 4)
  joined = none.joined(first).joined(later).joined(none)
  assert joined.bits == hosts.SIGTERM | hosts.SIGINT and joined.stop
  assert (joined.hosts, joined.first) == (2, 1)
  assert joined.signals() == "SIGTERM and SIGINT" and joined.who() == "process 1 and 1 other"
  assert none.joined(none).bits == 0 and none.joined(none).first is None
