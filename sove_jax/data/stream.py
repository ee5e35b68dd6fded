"""What every tf.data input of the package shares, and the training stream both training inputs
are built on (pretraining's `pipeline.TrainInput`, fine-tuning's `labeled.LabeledTrainInput`).

- Pieces: `tables` (a source's arrays as TF variables), `decode`, `ordered_map` (one parallel,
  order-keeping map), `options` (deterministic tf.data), `epoch_shape`, `processes`.
- `TrainStream`: this process's epochs of a source, each in a fixed order of (seed, epoch)
  (sove_jax/data/order.py), with "epoch" and "position" carried by every example so that the
  stream knows where it stands. It runs the epoch loop over the subclass's
  `dataset(epoch, position)`, names the examples that failed to decode, raises `InputFailed`
  for an epoch that gives no batch, and saves and restores its state (`get_state`,
  `set_state`, `order.merge_states`). A subclass says what becomes of the examples.
"""
from __future__ import annotations

import logging
import re

import jax
import numpy as np
import tensorflow as tf

from sove_jax.data import indexed, order, sources

log = logging.getLogger("sove_jax.data.pipeline")  # one logger for the input's lines

AUTOTUNE = tf.data.AUTOTUNE


class InputFailed(RuntimeError):
  """This process's training input gave no batch from a whole epoch: its examples do not decode
  (the message counts them and names the first, with its cause)."""


def processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(index, count) of this process, JAX's where not given."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} is not in [0, {count}).")
  return index, count


def options(threads: int) -> tf.data.Options:
  """Deterministic order; each op single-threaded; `threads` > 0: a private pool of that many."""
  opts = tf.data.Options()
  opts.deterministic = True
  opts.threading.max_intra_op_parallelism = 1
  if threads > 0:
    opts.threading.private_threadpool_size = threads
  return opts


def decode(example):
  """Encoded bytes -> uint8 [H, W, 3]; gray and palette images become RGB."""
  example = dict(example)
  image = tf.io.decode_image(example.pop("bytes"), channels=3, expand_animations=False)
  return {**example, "image": image}


def tables(source, images: bool = True) -> dict:
  """The arrays a source read by index is read from, as TF variables made once per input
  (in-memory images only with `images`: in device mode they live on the device).

  Captured arrays would be serialized into every epoch's dataset graph (47 MB of Fashion-MNIST,
  ~80 MB of ImageNet file names); a variable is captured by handle. (A numpy lookup through
  tf.numpy_function would also do, but a Python callback in flight when an iterator is
  dropped deadlocks on the GIL.)
  """
  if isinstance(source, sources.ArraySource):
    out = {"label": tf.Variable(source.labels, trainable=False)}
    if images:
      out["image"] = tf.Variable(source.images, trainable=False)
    return out
  if isinstance(source, sources.FileSource):
    return {"path": tf.Variable(source.paths, trainable=False, dtype=tf.string),
            "label": tf.Variable(source.labels, trainable=False)}
  if isinstance(source, sources.EncodedSource):
    return {"bytes": tf.Variable(source.encoded, trainable=False, dtype=tf.string),
            "label": tf.Variable(source.labels, trainable=False)}
  return {}


def ordered_map(ds, *fns):
  """One parallel, order-keeping map of `fns` in sequence. Plain graph code: no AutoGraph."""
  def chained(*x):
    x = fns[0](*x)
    for fn in fns[1:]:
      x = fn(x)
    return x
  return ds.map(tf.autograph.experimental.do_not_convert(chained), num_parallel_calls=AUTOTUNE,
                deterministic=True)


def epoch_shape(source, global_batch_size: int, process_count: int, *, hint: str = ""):
  """(this process's batch, examples in the source, whole global batches per epoch) of a
  training stream; an error when the source cannot fill one global batch (`hint`: the remedy)."""
  num_examples = len(source)
  steps_per_epoch = num_examples // global_batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"{source.name}: {num_examples} examples do not fill one global batch of "
                     f"{global_batch_size}{'; ' + hint if hint else ''}.")
  return global_batch_size // process_count, num_examples, steps_per_epoch


def _cause(error: Exception) -> str:
  """The first line of an error, without TensorFlow's op tags."""
  text = (getattr(error, "message", "") or type(error).__name__).strip().splitlines()[0]
  return re.sub(r"\s*\[Op:.*$", "", re.sub(r"\{\{.*?\}\}\s*", "", text))


class TrainStream:
  """Iterator over this process's host-local training batches, epoch after epoch, resumable
  from `get_state()`. Subclasses define `dataset(epoch, position)`: batches whose "epoch" and
  "position" (int64 [b]) come from `records` and are removed here.
  """

  def __init__(self, source, data_config, *, global_batch_size: int, seed: int,
               process_index: int, process_count: int, images: bool = True, hint: str = ""):
    self.source, self.config = source, data_config
    self.seed = int(seed)
    self.process_index, self.process_count = process_index, process_count
    self.batch_size, self.num_examples, self.steps_per_epoch = epoch_shape(
        source, global_batch_size, process_count, hint=hint)
    self.skipped: set[str] = set()  # examples that did not decode (this process), named
    self.tables = tables(source, images=images)
    # The records hold the encoded bytes already (TFDS) rather than an index to read them by.
    self.encoded_records = isinstance(source, (sources.TfdsSource, indexed.ArrayRecordSource))
    self._epoch, self._position = 0, 0
    self._rest_of = None  # the merged state a rest epoch was restored from (order.py)
    self._iterator, self._orders = None, {}
    self._gates: list[indexed.Gate] = []  # of the dataset being built (`iterate`)

  def dataset(self, epoch: int, position: int = 0) -> tf.data.Dataset:
    raise NotImplementedError

  @property
  def epoch(self) -> int:
    """The epoch the next batch comes from; set it to start an epoch from its beginning."""
    return self._epoch

  @epoch.setter
  def epoch(self, epoch: int):
    self._drop()
    self._epoch, self._position, self._rest_of = int(epoch), 0, None

  # What an epoch reads -----------------------------------------------------------------------

  def records(self, epoch: int, position: int):
    """(dataset, head): this process's examples of `epoch` from `position` on; `head` turns each
    element into {"epoch", "position", "index"} (sources read by index) or {"epoch",
    "position", "bytes", "label"} (TFDS). Fuse the head into the first map: each map costs
    ~0.03 ms an example."""
    src = self.source
    tag = lambda i: {"epoch": tf.constant(epoch, tf.int64), "position": i}
    if isinstance(src, indexed.ArrayRecordSource):
      return self._indexed_records(epoch, position), lambda e: e
    if isinstance(src, sources.TfdsSource):
      words = [self.seed, self.process_index, epoch]
      shuffle_seed = int(np.random.SeedSequence(words).generate_state(1)[0])
      ds = src.host_records(self.process_index, self.process_count, drop_remainder=True,
                            shuffle_seed=shuffle_seed, shuffle_buffer=self.config.shuffle_buffer)
      return (ds.enumerate().skip(position),  # skips undecoded records
              lambda i, r: {**tag(i), "bytes": r[0], "label": r[1]})
    if self._in_rest(epoch):  # after a restart on another process count: computed here
      indices = tf.data.Dataset.from_tensor_slices(self.epoch_order(epoch))
    else:  # a permutation in the graph (no array of the epoch's indices in it)
      epoch_order = lambda _: tf.data.Dataset.from_tensor_slices(order.host_order(
          len(src), self.seed, epoch, self.process_index, self.process_count))
      # Plain graph ops: AutoGraph has nothing to convert (and warns that it cannot).
      indices = tf.data.Dataset.from_tensors(0).flat_map(
          tf.autograph.experimental.do_not_convert(epoch_order))
    return indices.enumerate().skip(position), lambda i, index: {**tag(i), "index": index}

  def _indexed_records(self, epoch: int, position: int) -> tf.data.Dataset:
    """ArrayRecord: the positions from `position` on, each mapped to its example by itself
    (`order.shuffled`; in a rest epoch, looked up), read one batch of indices per Python call."""
    src, rest = self.source, self._in_rest(epoch)
    table = tf.constant(self.epoch_order(epoch)) if rest else None
    gate = indexed.Gate()
    self._gates.append(gate)

    def read(positions):
      if rest:
        index = tf.gather(table, positions)
      else:
        index = order.shuffled(positions, len(src), self.seed, epoch, self.process_index,
                               self.process_count)
      encoded, label = src.read(index, gate)
      return {"epoch": tf.fill(tf.shape(positions), tf.constant(epoch, tf.int64)),
              "position": positions, "bytes": encoded, "label": label}
    positions = tf.data.Dataset.range(position, self._epoch_length(epoch))
    return ordered_map(positions.batch(self.batch_size), read).unbatch()

  def read_encoded(self, example):
    """An example read by index from a folder (the file) or from memory: "bytes", "label"."""
    example = dict(example)  # traced functions may not change their arguments
    index = example.pop("index")
    if "path" in self.tables:
      encoded = tf.io.read_file(tf.gather(self.tables["path"], index))
    else:
      encoded = tf.gather(self.tables["bytes"], index)
    return {**example, "bytes": encoded, "label": tf.gather(self.tables["label"], index)}

  def _in_rest(self, epoch: int) -> bool:
    return self._rest_of is not None and epoch <= order.last_rest_epoch(self._rest_of)

  def _plain_order(self, epoch: int, index: int, count: int) -> np.ndarray:
    """Process `index` of `count`'s order of a normal epoch (the permutation made once)."""
    n = len(self.source)
    if isinstance(self.source, indexed.ArrayRecordSource):
      return order.shuffled(np.arange(n // count), n, self.seed, epoch, index, count).numpy()
    key = ("perm", epoch)
    if key not in self._orders:
      self._orders = {k: v for k, v in self._orders.items() if k[1] >= epoch - 1}
      self._orders[key] = order.host_order(len(self.source), self.seed, epoch, 0, 1).numpy()
    return self._orders[key][index::count][: len(self.source) // count]

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The example indices this process reads in `epoch`, in order (sources read by index)."""
    key = ("order", epoch)
    if key not in self._orders:
      self._orders[key] = order.process_order(self._plain_order, epoch, self.process_index,
                                              self.process_count,
                                              self._rest_of if self._in_rest(epoch) else None)
    return self._orders[key]

  def _epoch_length(self, epoch: int) -> int:
    """Examples this process tries in `epoch`."""
    if not self._in_rest(epoch) and self.encoded_records:  # TFDS, streamed or by index: its
      return self.num_examples // self.process_count    # order is no array to measure
    return len(self.epoch_order(epoch))

  # Iteration ---------------------------------------------------------------------------------

  def iterate(self, epoch: int = 0, position: int = 0, **kwargs) -> indexed.GatedIterator:
    """A numpy iterator over `dataset(epoch, position, **kwargs)`; `close()` it (or drop it)
    to stop its reads before it goes (sove_jax/data/indexed.py)."""
    return self._gated(lambda: self.dataset(epoch, position, **kwargs))

  def _gated(self, build) -> indexed.GatedIterator:
    self._gates = []
    ds = build()
    gates, self._gates = self._gates, []
    return indexed.GatedIterator(ds, gates)

  def _drop(self):
    if self._iterator is not None:
      self._iterator.close()
    self._iterator = None

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    while True:
      if self._iterator is None:
        self._epoch_start = self._position
        self._yielded = False
        self._iterator = self.iterate(self._epoch, self._position)
      try:
        batch = next(self._iterator)
        break
      except StopIteration:
        self._drop()
        if not self._yielded and self._epoch_start == 0:
          tried = self._epoch_length(self._epoch)
          if tried >= self.batch_size:  # a rest epoch may hold less than a batch
            raise self._failure(self._epoch, tried) from None
        self._epoch, self._position = self._epoch + 1, 0
        if self._rest_of is not None and not self._in_rest(self._epoch):
          self._rest_of = None
    self._yielded = True
    batch.pop("epoch")
    positions = batch.pop("position")
    self._count_skipped(positions)
    self._position = int(positions[-1]) + 1
    return batch

  def _failure(self, epoch: int, tried: int) -> InputFailed:
    """What went wrong in an epoch that gave no batch: the examples that decode, counted again
    (read and decoded, nothing else), and the first that did not, with the error it raised."""
    where = f"{self.source.name}: process {self.process_index} of {self.process_count}"
    if isinstance(self.source, sources.ArraySource):  # arrays in memory never fail
      return InputFailed(f"{where} got no batch from epoch {epoch} of {tried} examples.")
    read = [] if self.encoded_records else [self.read_encoded]
    positions = self._gated(lambda: ordered_map(*self.records(epoch, 0), *read, decode)
                            .ignore_errors(log_warning=False)
                            .map(lambda e: {"position": e["position"]}))
    decoded = {int(e["position"]) for e in positions}
    first = next(p for p in range(tried) if p not in decoded)
    cause = ""
    examples = self._gated(lambda: ordered_map(*self.records(epoch, first), *read)
                           .map(lambda e: {"bytes": e["bytes"]}))
    try:
      decode({"bytes": tf.constant(next(examples)["bytes"])})
    except (tf.errors.OpError, StopIteration) as e:
      cause = _cause(e)
    finally:
      examples.close()
    name = self._describe(epoch, [first])[0]
    return InputFailed(
        f"{where} got no batch from epoch {epoch}: {tried - len(decoded)} of the {tried} "
        f"examples it tried failed to decode ({len(decoded)} decoded, fewer than its batch of "
        f"{self.batch_size}); the first: {name}" + (f" ({cause})." if cause else "."))

  def _describe(self, epoch: int, positions) -> list[str]:
    """Names of the examples at `positions` of this process's `epoch`."""
    if not self.source.by_index:
      return [f"{self.source.describe(p)} of epoch {epoch}" for p in positions]
    indices = self.epoch_order(epoch)
    return [self.source.describe(int(indices[p])) for p in positions]

  def _count_skipped(self, positions):
    """Positions missing between batches are examples dropped by the decoder: name them once."""
    missing = sorted(set(range(self._position, int(positions[-1]) + 1)) - set(positions.tolist()))
    if not missing:
      return
    names = self._describe(self._epoch, missing)
    new = sorted(set(names) - self.skipped)
    self.skipped.update(names)
    if new:
      log.warning("Skipped %d example(s) that did not decode: %s (%d so far).", len(new),
                  ", ".join(new), len(self.skipped))

  # State -------------------------------------------------------------------------------------

  def get_state(self) -> dict:
    """Where this process's stream stands: the next example of its epoch order (JSON-able; a
    checkpoint holds every process's, `order.merge_states`). In a rest epoch (after a restart
    on another process count) also "rest_of", the state it was restored from."""
    state = {"epoch": self._epoch, "position": self._position, "process_count": self.process_count}
    if self._rest_of is not None:
      state["rest_of"] = self._rest_of
    return state

  def set_state(self, saved: dict) -> None:
    """Continue from a checkpoint's input state: `merge_states`' (this process's entry, or the
    unread rest of the epoch re-split over another process count), or one process's state as
    older checkpoints hold it. The epoch is rebuilt and the consumed part skipped, not replayed.
    """
    if order.is_merged(saved):
      refuse = ""
      if not self.source.by_index:
        refuse = (f"The input state was saved by {saved.get('process_count')} processes and this "
                  f"run has {self.process_count}: {self.source.name} is a stream of TFRecord "
                  "records, which cannot be re-split exactly; restart on the same number of "
                  "processes.")
      epoch, position, rest_of = order.restore(saved, self.process_index, self.process_count,
                                               refuse=refuse)
      if rest_of is not None and rest_of is saved:
        log.warning("Input state saved by %d processes, resuming with %d: the examples of "
                    "epoch %d that no process had read are shared out first, then epochs "
                    "continue as usual.", saved["process_count"], self.process_count, epoch)
    else:  # one process's state (older checkpoints: process 0's)
      epoch, position, rest_of = int(saved["epoch"]), int(saved["position"]), None
      if int(saved.get("process_count", self.process_count)) != self.process_count:
        # Other process count, other per-process orders: keep the same fraction of the epoch.
        position = position * int(saved["process_count"]) // self.process_count
        log.warning("Input state was saved with %s processes, resuming with %d: continuing at "
                    "the same fraction of epoch %d, not the exact stream.",
                    saved["process_count"], self.process_count, epoch)
    if epoch < 0 or position < 0:
      raise ValueError(f"Bad input state {saved}.")
    self._drop()
    self._epoch, self._position, self._rest_of = epoch, position, rest_of
    self._orders = {}
    length = self._epoch_length(epoch)
    if not self.source.by_index and position >= max(1, length // 10):
      log.warning("Resuming %s at position %d of %d in epoch %d: a TFRecord stream resumes by "
                  "reading the %d records before it again. Prepared as ArrayRecord (`tfds build "
                  "%s --file_format=array_record --data_dir=...`), the dataset is read by index "
                  "and resumes without reading them.", self.source.name, position, length,
                  epoch, position, self.source.name.split("/")[0])
