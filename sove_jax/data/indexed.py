"""A prepared TFDS split in ArrayRecord files, read by index inside tf.data.

ImageNet in TFRecord files is a stream: resuming late in an epoch re-reads the epoch up to there
(`sources.TfdsSource`). Prepared as ArrayRecord (`tfds build imagenet2012
--file_format=array_record ...`), any record is read at its index, so an epoch's order is a
function of the position (`order.shuffled`: `tf.random.experimental.index_shuffle` seeded by
(seed, epoch)) and a pipeline built at position N reads nothing before N.

tf.data stays the pipeline: it computes the indices, batches them, and makes one Python call per
batch of indices (`ArrayRecordSource.read`, through `tf.numpy_function`), which reads the
records with ArrayRecord's reader (threads of its own, no GIL held while it reads; gs:// paths
go to its GCS reader) and returns the serialized examples; parsing and decoding are graph ops
again.

A Python callback in flight when its tf.data iterator is destroyed can deadlock: the destroying
thread holds the GIL while it waits for the pipeline's threads, one of which waits for the GIL
to finish its callback. So every callback passes a `Gate`, and an iterator over a pipeline with
callbacks is only dropped through `GatedIterator.close`, which shuts the gate, waits (GIL
released) until no callback is running, and only then lets the iterator go. The gate is graph
state (TF variables): a pipeline thread first counts itself in, then reads the gate, and calls
Python only if it is open; once the gate is shut and the count is zero, no thread is in a
callback and none can enter one, so destroying the iterator waits for nothing that needs the
GIL. tests/test_data_indexed.py drops iterators mid-epoch repeatedly in a subprocess with a
timeout.
"""
from __future__ import annotations

import atexit
import logging
import sys
import time
import weakref

import numpy as np
import tensorflow as tf

log = logging.getLogger("sove_jax.data.pipeline")


# --- gated Python callbacks ---------------------------------------------------------------------

class Gate:
  """Lets a pipeline's Python callbacks be stopped, and waited for, before its iterator goes."""

  def __init__(self):
    self._open = tf.Variable(True, trainable=False)
    self._running = tf.Variable(0, dtype=tf.int64, trainable=False)

  def call(self, fn, inputs: list, shut_value: list):
    """`tf.numpy_function(fn, inputs)` in graph code when the gate is open, else `shut_value`
    (tensors of the outputs' dtypes and shapes) without calling Python. `fn` returns a list of
    arrays. An exception in `fn` is raised by the graph after the call has counted itself out
    (a count left behind would make `shut` wait forever)."""
    dtypes = [v.dtype for v in shut_value]

    def guarded(*args):
      try:
        return [*fn(*args), np.bytes_(b"")]
      except Exception as e:  # noqa: BLE001  (raised again, in graph, below)
        return [np.zeros(0, object if d == tf.string else d.as_numpy_dtype) for d in dtypes] + [
            np.bytes_(f"{type(e).__name__}: {e}".encode())]

    enter = self._running.assign_add(1)
    with tf.control_dependencies([enter]):
      is_open = self._open.read_value()
    results = tf.cond(
        is_open,
        lambda: tf.numpy_function(guarded, inputs, dtypes + [tf.string], stateful=True),
        lambda: [tf.identity(v) for v in shut_value] + [tf.constant(b"")])
    with tf.control_dependencies(results):
      leave = self._running.assign_sub(1)
    error = results[-1]
    with tf.control_dependencies([leave]):
      check = tf.debugging.Assert(tf.equal(error, b""), [error])
    with tf.control_dependencies([check]):
      return [tf.ensure_shape(o, v.shape) for o, v in zip(results[:-1], shut_value)]

  # `open` and `shut` run eagerly whatever graph is being built: the garbage collector may drop
  # an old iterator (whose `__del__` shuts its gates) while another pipeline's graph is traced,
  # and a variable op made there would join that graph, and deadlock on its lock, instead of
  # running.

  def open(self):
    with tf.init_scope():
      self._open.assign(True)

  def shut(self, poll: float = 0.001, warn_after: float = 60.0):
    """Shuts the gate and returns once no callback runs (sleeping: the GIL is free for them)."""
    with tf.init_scope():
      self._open.assign(False)
      start, warned = time.monotonic(), False
      while int(self._running.read_value()) > 0:
        if not warned and time.monotonic() - start > warn_after:
          log.warning("Still waiting for %d input read(s) to finish before dropping the "
                      "pipeline.", int(self._running.read_value()))
          warned = True
        time.sleep(poll)


_LIVE: "weakref.WeakSet[GatedIterator]" = weakref.WeakSet()


@atexit.register
def _close_live():
  """Before the interpreter finalizes (when a callback thread could no longer take the GIL to
  finish), every iterator still open is closed."""
  for iterator in list(_LIVE):
    try:
      iterator.close()
    except Exception:  # noqa: BLE001  (exiting anyway)
      pass


class GatedIterator:
  """A numpy iterator over `dataset` whose Python callbacks pass `gates`; `close()` (or losing
  the last reference to it, or the interpreter's exit) shuts them and waits before the
  tf.data iterator is dropped."""

  def __init__(self, dataset: tf.data.Dataset, gates=()):
    self._gates = list(gates)
    for gate in self._gates:
      gate.open()
    self._iterator = dataset.as_numpy_iterator()
    if self._gates:
      _LIVE.add(self)

  def __iter__(self):
    return self

  def __next__(self):
    if self._iterator is None:
      raise StopIteration
    return next(self._iterator)

  def close(self):
    if self._iterator is None:
      return
    for gate in self._gates:
      gate.shut()
    self._iterator = None  # destroyed here, with no callback running or able to start

  def __del__(self, _finalizing=sys.is_finalizing):  # bound now: `sys` may be gone at exit
    if _finalizing():  # too late: callbacks cannot run; `_close_live` ran before
      return
    try:
      self.close()
    except Exception:  # TensorFlow half torn down
      pass


# --- the source -------------------------------------------------------------------------------

class ArrayRecordSource:
  """A prepared TFDS split in ArrayRecord files: (encoded image, int32 label) read by index.

  `indices`: the split's records this source holds, in order (how a split is carved); None:
  all of them. Made by `sources.open_source` when the prepared dataset's file format is
  ArrayRecord.
  """

  by_index = True

  def __init__(self, builder, name: str, split: str, image_key: str, label_key: str,
               indices=None, label: str = ""):
    import tensorflow_datasets as tfds  # the caller has imported it already
    self.builder, self.split, self.image_key, self.label_key = builder, split, image_key, label_key
    self.name = f"{name}/{label or split}"
    self._data_source = builder.as_data_source(
        split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    self.split_size = len(self._data_source)
    if self.split_size == 0:
      raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty.")
    self.indices = None if indices is None else np.asarray(indices, np.int64)
    self._records = None  # the reader, opened at the first read
    features = builder.info.features
    # Defaults only for what a shut gate returns (empty records), which nothing reads.
    spec = {image_key: tf.io.FixedLenFeature([], tf.string, default_value="")}
    if label_key:
      dtype = features[label_key].tf_dtype
      spec[label_key] = tf.io.FixedLenFeature([], dtype, default_value=tf.constant(-1, dtype))
    self._spec = spec
    self._index_table = None

  def __len__(self) -> int:
    return self.split_size if self.indices is None else len(self.indices)

  def describe(self, index: int) -> str:
    return f"{self.name} record {int(self.record(index))}"

  def record(self, index):
    """The split's record number of this source's example `index`."""
    return index if self.indices is None else self.indices[index]

  def _read_records(self, records: np.ndarray) -> np.ndarray:
    """Python side of `read`: serialized examples of `records` (numbers in the split)."""
    if self._records is None:
      self._records = self._data_source.data_source  # ArrayRecord's thread-safe reader
    return np.asarray(self._records.__getitems__(records.tolist()), dtype=object)

  def read(self, index, gate: Gate):
    """Graph code: int64 [n] example indices -> (encoded images [n], int32 labels [n]), one
    Python call (through `gate`) for the batch."""
    if self.indices is not None:
      if self._index_table is None:
        self._index_table = tf.Variable(self.indices, trainable=False)
      index = tf.gather(self._index_table, index)
    n = tf.shape(index)[0]
    serialized, = gate.call(lambda i: [self._read_records(i)], [index], [tf.fill([n], "")])
    parsed = tf.io.parse_example(serialized, self._spec)
    label = (tf.cast(parsed[self.label_key], tf.int32) if self.label_key
             else tf.fill([n], tf.constant(-1, tf.int32)))
    return parsed[self.image_key], label

  def subset(self, indices, label: str) -> "ArrayRecordSource":
    """The examples `indices` of this source, in that order, as a source."""
    return ArrayRecordSource(self.builder, self.name.split("/")[0], self.split, self.image_key,
                             self.label_key, indices=self.record(np.asarray(indices, np.int64)),
                             label=label)

  def labels(self, batch: int = 1024) -> np.ndarray:
    """int32 labels of every example, in order (reads every record once)."""
    gate = Gate()
    ds = tf.data.Dataset.range(len(self)).batch(batch).map(lambda i: self.read(i, gate)[1])
    it = GatedIterator(ds, [gate])
    try:
      return np.concatenate(list(it)).astype(np.int32)
    finally:
      it.close()
