"""Which examples each process reads in each epoch, and the input state that says where every
process stands (docs/input.md, "Where the input stands").

A process's state is (epoch, position): the next entry of its epoch order. A checkpoint holds
every process's (`merge_states`), because the processes' positions differ as soon as an example
fails to decode on one of them (the gap it leaves is a position no batch holds), and each
process must continue its own stream.

Restored on the same number of processes, each continues at its own (epoch, position). Restored
on another number, a source read by index is re-split exactly: the examples of the interrupted
epoch that no old process had read (`unread`), laid out process by process, are shared by the
new processes like an epoch (every P-th, the same count each; what does not fill a whole batch
waits, as at every epoch's end), then normal epochs follow at the new process count. Such a
"rest" epoch keeps its number and is described by the state it was restored from
(`rest_of`), so an interruption inside it is restored the same way. If the old processes stood
in two epochs (one finished its epoch while another had not), each epoch's unread examples make
one rest epoch. A stream of records (a TFRecord TFDS split) cannot be re-split: the callers
refuse it.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf


def host_order(num_examples: int, seed: int, epoch: int, process_index: int,
               process_count: int) -> tf.Tensor:
  """Example indices this process reads in `epoch`: every P-th of one permutation shared by all."""
  perm = tf.random.experimental.stateless_shuffle(tf.range(num_examples, dtype=tf.int64),
                                                  seed=tf.constant([seed, epoch], tf.int64))
  return perm[process_index::process_count][: num_examples // process_count]


def shuffled(positions, num_examples: int, seed: int, epoch: int, process_index: int,
             process_count: int):
  """Example indices at `positions` (int64, any shape) of this process's order of `epoch` for a
  source read through `index_shuffle` (ArrayRecord): slot position * P + p of one permutation
  of the examples shared by all processes, drawn from (seed, epoch) and computed per position
  (nothing of the order before a position is needed to find it). Graph or eager."""
  slots = tf.cast(positions, tf.int64) * process_count + process_index
  return tf.random.experimental.index_shuffle(
      slots, seed=tf.constant([seed, epoch], tf.int64),
      max_index=tf.constant(num_examples - 1, tf.int64))


def merge_states(states: list[dict]) -> dict:
  """Every process's `TrainInput.get_state()`, in process order, as one JSON-able dict for a
  checkpoint: {"process_count": P, "processes": [{"epoch": e, "position": k}, ...]}, plus
  "rest_of" (the state a rest epoch was restored from) while some process is in one."""
  count = len(states)
  if count == 0:
    raise ValueError("merge_states needs the state of every process, got none.")
  entries, rest_of = [], None
  for index, state in enumerate(states):
    if int(state.get("process_count", count)) != count:
      raise ValueError(f"Process {index}'s input state says {state['process_count']} processes, "
                       f"but {count} states were gathered.")
    entries.append({"epoch": int(state["epoch"]), "position": int(state["position"])})
    if "rest_of" in state:
      if rest_of is not None and state["rest_of"] != rest_of:
        raise ValueError(f"Process {index} is in another rest epoch than the processes before "
                         "it: their input states do not belong to one run.")
      rest_of = state["rest_of"]
  merged = {"process_count": count, "processes": entries}
  if rest_of is not None:
    merged["rest_of"] = rest_of
  return merged


def is_merged(state: dict) -> bool:
  """A merged state (every process's) rather than one process's (older checkpoints)."""
  return "processes" in state


def check_merged(state: dict) -> dict:
  """`state`, if it is a well-formed merged state; else a one-sentence error."""
  try:
    count, entries = int(state["process_count"]), state["processes"]
    ok = count == len(entries) >= 1 and all(
        int(e["epoch"]) >= 0 and int(e["position"]) >= 0 for e in entries)
  except (KeyError, TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"Bad input state {state}: expected {{'process_count': P, 'processes': "
                     "[P x {'epoch', 'position'}]}.")
  if "rest_of" in state:
    check_merged(state["rest_of"])
  return state


def last_rest_epoch(rest_of: dict) -> int:
  """The last epoch that restoring `rest_of` on another process count makes a rest epoch."""
  return max(int(e["epoch"]) for e in rest_of["processes"])


def process_order(plain, epoch: int, index: int, count: int, rest_of: dict | None) -> np.ndarray:
  """Example indices process `index` of `count` reads in `epoch`: its share of the epoch's
  unread examples in a rest epoch of `rest_of`, else `plain(epoch, index, count)`."""
  if rest_of is None or epoch > last_rest_epoch(rest_of):
    return np.asarray(plain(epoch, index, count), np.int64)
  left = unread(plain, epoch, rest_of)
  return left[index::count][: len(left) // count]


def unread(plain, epoch: int, state: dict) -> np.ndarray:
  """The examples of `epoch` that the processes of merged `state` had still to read, first the
  first entry of every process's rest, then the second, and so on (distinct examples)."""
  count = int(state["process_count"])
  parts, keys = [], []
  for index, entry in enumerate(state["processes"]):
    order = process_order(plain, epoch, index, count, state.get("rest_of"))
    at, position = int(entry["epoch"]), int(entry["position"])
    start = 0 if epoch > at else (min(position, len(order)) if epoch == at else len(order))
    parts.append(order[start:])
    keys.append(np.arange(len(order) - start) * count + index)
  if not parts:
    return np.zeros(0, np.int64)
  keys = np.concatenate(keys)
  return np.concatenate(parts)[np.argsort(keys, kind="stable")]


def restore(saved: dict, process_index: int, process_count: int, *, refuse: str = ""):
  """(epoch, position, rest_of) of process `process_index` of `process_count` from a merged
  state. `refuse`: the sentence to raise when the count differs and the source cannot be
  re-split (empty: it can)."""
  saved = check_merged(saved)
  old = int(saved["process_count"])
  if old == process_count:
    entry = saved["processes"][process_index]
    epoch = int(entry["epoch"])
    rest_of = saved.get("rest_of")
    if rest_of is not None and epoch > last_rest_epoch(rest_of):
      rest_of = None
    return epoch, int(entry["position"]), rest_of
  if refuse:
    raise ValueError(refuse)
  first = min(int(e["epoch"]) for e in saved["processes"])
  return first, 0, saved
