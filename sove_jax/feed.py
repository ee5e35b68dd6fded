"""The batches on their way to the devices: built ahead, on a thread, while the step runs.

`Feed` pulls host batches from the training input, adds this host's flags (`hosts.flag_rows`)
and puts them on the devices (`jax.make_array_from_process_local_data`) on a background thread,
`depth` batches ahead, so that the host-to-device copy of the next batch overlaps the current
step; the main thread only takes finished batches. `depth=0` does the same work on the main
thread, between steps (what the loop did before).

Each batch travels with the input position *after* it (`Item.input_state`): the input itself
runs ahead by up to `depth` batches, so the position a checkpoint saves is the one of the last
batch a step consumed, not the input's own.

An input that raises (a host whose every file is corrupt, a storage error) does not stop this
host alone: in a multi-process run the feed keeps sending batches of the right shapes (zeros),
flagged `hosts.INPUT_FAILED`, and every host stops after the same step (`hosts`); the error is
kept for this host's line. In a single-process run it is raised where the batch is taken.
"""
from __future__ import annotations

import queue
import threading
from typing import NamedTuple

import jax
import numpy as np

from sove_jax import hosts


class Item(NamedTuple):
  batch: dict           # global jax.Arrays (with "host_flags" when the feed adds flags)
  input_state: dict     # the input's position after this batch
  bits: int             # this host's flags in it


class Feed:
  """next() -> Item; close() stops the thread (after its batch in progress)."""

  def __init__(self, train_input, sharding, *, depth: int, local_shapes: dict,
               stop_signals: hosts.StopSignals | None = None, flags: bool = True,
               process_index: int | None = None, raise_input_errors: bool = False):
    """`local_shapes`: {name: (shape, dtype)} of this host's batch (the zeros sent after an input
    failure); `flags`: add the "host_flags" column; `raise_input_errors`: raise the input's error
    at `next` instead of flagging it (a single process has no one to tell)."""
    self._input, self._sharding = train_input, sharding
    self._local_shapes = local_shapes
    self._signals = stop_signals
    self._flags = flags
    self._process = jax.process_index() if process_index is None else process_index
    self._raise = raise_input_errors
    self.error: BaseException | None = None  # the input's error, once it failed
    self._state_after_error: dict | None = None
    self.depth = int(depth)
    self._closed = threading.Event()
    if self.depth > 0:
      self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
      self._thread = threading.Thread(target=self._fill, daemon=True, name="sove_jax-feed")
      self._thread.start()

  # -- building one batch ------------------------------------------------------------------------

  def _host_batch(self) -> tuple[dict, dict, int]:
    bits = self._signals.bits if self._signals is not None else 0
    if self.error is None:
      try:
        batch = next(self._input)
        return batch, self._input.get_state(), bits
      except Exception as e:  # noqa: BLE001  every host must hear of it (module docstring)
        if self._raise:
          raise
        self.error = e
        self._state_after_error = self._input.get_state()
    zeros = {k: np.zeros(shape, dtype) for k, (shape, dtype) in self._local_shapes.items()}
    return zeros, self._state_after_error, bits | hosts.INPUT_FAILED

  def _build(self) -> Item:
    batch, state, bits = self._host_batch()
    if self._flags:
      rows = len(next(iter(batch.values())))
      batch = {**batch, "host_flags": hosts.flag_rows(bits, self._process, rows)}
    return Item(to_global(batch, self._sharding), state, bits)

  # -- the thread --------------------------------------------------------------------------------

  def _fill(self):
    while not self._closed.is_set():
      try:
        item = self._build()
      except BaseException as e:  # noqa: BLE001  handed to the main thread at next()
        item = e
      while not self._closed.is_set():
        try:
          self._queue.put(item, timeout=0.5)
          break
        except queue.Full:
          continue
      if isinstance(item, BaseException):
        return

  def __iter__(self):
    return self

  def __next__(self) -> Item:
    if self.depth == 0:
      return self._build()
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    """Stops building; waits for the batch in progress (bounded: one batch of input)."""
    self._closed.set()
    if self.depth > 0:
      while True:  # unblock a put
        try:
          self._queue.get_nowait()
        except queue.Empty:
          break
      self._thread.join(timeout=60)


def to_global(host_batch: dict, sharding) -> dict:
  """This host's numpy batch -> global jax.Arrays, the batch axis split over the processes."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in host_batch.items()}


def local_shapes(batch: dict, process_count: int) -> dict:
  """{name: (shape, dtype)} of one host's share of the abstract global batch (`train.
  batch_shapes`), for the entries the input sends (the batch axis split over the processes)."""
  return {k: ((v.shape[0] // process_count,) + tuple(v.shape[1:]), v.dtype)
          for k, v in batch.items()}

