"""TFDS ArrayRecord read by index inside tf.data (sove_jax/data/indexed.py): picked by
data.source="tfds" for ArrayRecord-prepared data, resumes at a position without reading what
came before it, shares every epoch between processes, re-splits on another process count, and
drops its iterators mid-epoch without deadlocking."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import default
from sove_jax.data import indexed, labeled, order, pipeline, sources, synthetic

N, CLASSES = 48, 3


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("indexed"))
  return synthetic.write(root, images=N, classes=CLASSES, test_images=6, seed=3, progress=None)


def _config(data_dir, **overrides):
  d = default.get_config().data
  d.update(source="tfds", name=synthetic.NAME, data_dir=data_dir, augment="device",
           canvas_size=64, global_size=28, eval_resize=32, eval_crop=28, minival_examples=12,
           prefetch=1)
  d.update(**overrides)
  return d


def _train(d, *, batch=4, index=0, count=1, seed=0):
  return pipeline.TrainInput(sources.open_source(d, "train"), d, patch_size=7,
                             global_batch_size=batch, seed=seed, process_index=index,
                             process_count=count)


class _Recorder:
  """Records the record numbers each Python read asks for (wraps the source's reader): `calls`,
  one list a call, in the order the calls came (parallel reads may finish in any order)."""

  def __init__(self, source):
    self.calls, read = [], source._read_records
    source._read_records = lambda records: (self.calls.append(records.tolist()),
                                            read(records))[1]

  @property
  def records(self):
    return [r for call in self.calls for r in call]


def _same(got, want):
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_tfds_picks_the_indexed_reader_for_array_record_and_the_stream_for_tfrecord(written):
  assert isinstance(sources.open_source(_config(written["array_record"]), "train"),
                    indexed.ArrayRecordSource)
  assert isinstance(sources.open_source(_config(written["tfrecord"]), "train"),
                    sources.TfdsSource)


def test_a_pipeline_built_late_in_an_epoch_reads_nothing_before_its_position(written):
  """Built at position 40 of 48, the pipeline's reads ask only for the records at positions
  40 and on (one Python call per batch of 4), and its batches are the uninterrupted stream's."""
  d = _config(written["array_record"])
  straight = _train(d)
  want = [next(straight) for _ in range(12)][10:]  # positions 40..47
  resumed = _train(d)
  seen = _Recorder(resumed.source)
  resumed.set_state({"process_count": 1, "processes": [{"epoch": 0, "position": 40}]})
  got = [next(resumed) for _ in range(2)]
  for g, w in zip(got, want):
    _same(g, w)
  late = set(order.shuffled(np.arange(40, 48), N, 0, 0, 0, 1).numpy().tolist())
  first_epoch = [r for r in seen.records if r in late]
  assert len(first_epoch) == 8 and set(first_epoch) == late
  assert len(seen.records) <= 8 + 4 * (d.prefetch + 2)  # epoch 1 may be read ahead, no more


def test_each_process_reads_a_disjoint_share_of_every_epoch_in_a_new_order(written):
  d = _config(written["array_record"])
  shares = []
  for p in range(2):
    stream = _train(d, batch=8, index=p, count=2)
    seen = _Recorder(stream.source)
    for _ in range(6):  # one epoch: 48 // 8
      next(stream)
    epoch0, order0 = seen.calls[:6], stream.epoch_order(0)
    # One Python call a batch of 4 (calls finish in any order), in the order epoch_order says.
    assert sorted(epoch0) == sorted(order0[i:i + 4].tolist() for i in range(0, 24, 4))
    shares.append(set(order0.tolist()))
    assert len(shares[-1]) == 24
    assert not np.array_equal(stream.epoch_order(1), stream.epoch_order(0))
  assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == N


def test_another_process_count_reads_the_unread_records_of_the_epoch_once(written):
  d = _config(written["array_record"])
  states, read = [], set()
  for p, steps in ((0, 3), (1, 1)):  # 2 processes of 4, stopped at 12 and 4 of their 24
    stream = _train(d, batch=8, index=p, count=2)
    seen = _Recorder(stream.source)
    for _ in range(steps):
      next(stream)
    read |= set(stream.epoch_order(0)[: 4 * steps].tolist())
    states.append(stream.get_state())
  merged = json.loads(json.dumps(pipeline.merge_states(states)))
  one = _train(d, batch=4)
  seen = _Recorder(one.source)
  one.set_state(merged)
  for _ in range(8):  # 48 - 16 = 32 unread: 8 batches of 4
    next(one)
  assert one.get_state()["epoch"] == 0 and "rest_of" in one.get_state()
  assert sorted(seen.records[:32]) == sorted(set(range(N)) - read)
  next(one)
  assert one.get_state() == {"epoch": 1, "position": 4, "process_count": 1}


def test_a_tfrecord_stream_resumed_late_says_it_reads_again_and_how_to_avoid_it(written, caplog):
  stream = _train(_config(written["tfrecord"], shuffle_buffer=8))
  with caplog.at_level(logging.WARNING, logger="sove_jax.data.pipeline"):
    stream.set_state({"process_count": 1, "processes": [{"epoch": 0, "position": 44}]})
  assert "reading the 44 records before it again" in caplog.text
  assert f"tfds build {synthetic.NAME} --file_format=array_record" in caplog.text
  assert next(stream)["canvas"].shape == (4, 64, 64, 3)


def _record_bytes(source):
  if isinstance(source, indexed.ArrayRecordSource):
    gate = indexed.Gate()
    import tensorflow as tf
    ds = tf.data.Dataset.range(len(source)).batch(16).map(lambda i: source.read(i, gate)[0])
    return [b for batch in indexed.GatedIterator(ds, [gate]) for b in batch]
  return [image for image, _ in source.host_records(0, 1, drop_remainder=False)
          .as_numpy_iterator()]


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_tfds_minival_is_a_seeded_slice_of_train_and_train_minival_the_rest(written, file_format):
  d = _config(written[file_format])
  train = _record_bytes(sources.open_source(d, "train"))
  held = _record_bytes(sources.open_source(d, "minival"))
  rest = _record_bytes(sources.open_source(d, "train-minival"))
  assert len(held) == 12 and len(rest) == N - 12
  assert not set(held) & set(rest) and sorted(held + rest) == sorted(train)
  start = train.index(held[0])
  assert train[start:start + 12] == held  # a block of consecutive records
  assert _record_bytes(sources.open_source(d, "minival")) == held
  d.minival_seed = 1
  assert _record_bytes(sources.open_source(d, "minival")) != held


def test_evaluation_and_fine_tuning_read_array_record(written):
  import tensorflow_datasets as tfds
  d = _config(written["array_record"])
  ev = pipeline.eval_input(d, split="test", global_batch_size=4, process_index=0, process_count=1)
  for _ in range(2):  # re-iterable; the second pass stops early, its reads stopped first
    batches = iter(ev)
    first = next(batches)
    assert first["image"].shape == (4, 28, 28, 3)
    del batches
  assert sum(int(b["valid"].sum()) for b in ev) == 6 and ev.num_skipped == 0
  src = sources.open_source(d, "train")
  truth = tfds.data_source(synthetic.NAME, split="train", data_dir=written["array_record"],
                           decoders={"image": tfds.decode.SkipDecoding()})
  np.testing.assert_array_equal(labeled.split_labels(src),
                                [truth[i]["label"] for i in range(len(truth))])
  stream = labeled.labeled_train_input(d, split="train", indices=[1, 4, 7, 9, 20, 33], size=16,
                                       scale=(0.5, 1.0), ratio=(0.75, 1.33), flip=True,
                                       global_batch_size=4, seed=0, process_index=0,
                                       process_count=1)
  assert isinstance(stream.source, indexed.ArrayRecordSource) and len(stream.source) == 6
  assert next(stream)["image"].shape == (4, 16, 16, 3)


# --- dropping iterators with reads in flight: no deadlock --------------------------------------

def test_a_shut_gate_calls_no_python_and_an_error_in_a_read_is_raised_and_counted_out():
  import tensorflow as tf
  gate, calls = indexed.Gate(), []

  def double(x):
    calls.append(x.tolist())
    if x.sum() > 10:
      raise OSError("the bucket said 503")
    return [x * 2]
  ds = tf.data.Dataset.range(8).batch(4).map(
      lambda x: gate.call(double, [x], [tf.fill(tf.shape(x), tf.constant(-1, tf.int64))])[0])
  it = indexed.GatedIterator(ds, [gate])
  np.testing.assert_array_equal(next(it), [0, 2, 4, 6])
  with pytest.raises(tf.errors.InvalidArgumentError, match="OSError: the bucket said 503"):
    next(it)
  assert int(gate._running.read_value()) == 0  # counted out despite the error
  it.close()
  calls.clear()
  gate.shut()
  np.testing.assert_array_equal(next(ds.as_numpy_iterator()), [-1, -1, -1, -1])
  assert calls == []



def drop_iterators_mid_epoch(data_dir: str, drops: int) -> dict:
  """The child of the test below: builds pipelines at random positions and drops them as soon
  as a batch is out, with slow reads that hold the GIL, so that reads are in flight at most
  drops; also drops whole inputs and evaluation passes by losing the last reference (inputs
  hold reference cycles, so the garbage collector drops them: at any point, in any thread)."""
  import tensorflow as tf
  read = indexed.ArrayRecordSource._read_records

  def slow_read(self, records):
    end = time.perf_counter() + 0.004
    while time.perf_counter() < end:  # Python work holding the GIL, as a parser's would
      pass
    return read(self, records)
  indexed.ArrayRecordSource._read_records = slow_read
  in_flight, shut = [], indexed.Gate.shut

  def counting_shut(self, *args, **kwargs):
    # Eagerly, as `shut` itself reads: the garbage collector may call this while a graph is
    # being traced, and a read made there would join that graph and wait on its lock for ever.
    with tf.init_scope():
      in_flight.append(int(self._running.read_value()))
    return shut(self, *args, **kwargs)
  indexed.Gate.shut = counting_shut
  d = _config(data_dir, prefetch=2)
  rng = np.random.default_rng(0)
  stream = _train(d)
  for k in range(drops):
    position = int(rng.integers(0, N - 4))
    stream.set_state({"epoch": k % 3, "position": position, "process_count": 1})  # drops
    next(stream)
    if k % 10 == 0:  # the last reference to a running input goes
      other = _train(d)
      next(other)
      del other
      ev = pipeline.eval_input(d, split="train", global_batch_size=4, process_index=0,
                               process_count=1)
      next(iter(ev))
      del ev
  return {"drops": len(in_flight), "in_flight": sum(n > 0 for n in in_flight)}


@pytest.mark.slow
def test_an_iterator_dropped_while_another_graph_is_traced_shuts_its_gates_eagerly():
  """The garbage collector may run an old iterator's `__del__` while another pipeline's graph
  is being traced (a full-suite run hung there once): shutting its gates must run at once, not
  become ops of that graph."""
  import tensorflow as tf
  gate = indexed.Gate()
  old = indexed.GatedIterator(tf.data.Dataset.range(3), [gate])

  @tf.function
  def traced(x):
    old.close()   # what `__del__` does, here mid-trace
    return x + 1

  assert int(traced(tf.constant(1))) == 2
  assert not bool(gate._open.numpy()) and int(gate._running.numpy()) == 0
  assert next(old, None) is None


@pytest.mark.slow
def test_dropping_iterators_with_reads_in_flight_never_deadlocks(written):
  """A subprocess drops its pipeline 60 times mid-epoch while Python reads are running; a
  deadlock would stop it, and the test kills it (SIGKILL) at the time limit and fails with
  every thread's stack, which the child prints (faulthandler) shortly before. The drops take
  about 30 s on 2 cores beside two trainers, and 250 s under a load of 7."""
  here = os.path.dirname(os.path.abspath(__file__))
  code = ("import sys, json, faulthandler; faulthandler.dump_traceback_later(570, exit=False); "
          f"sys.path[:0] = [{here!r}, {os.path.dirname(here)!r}]; import test_data_indexed as t; "
          f"print('RESULT', json.dumps(t.drop_iterators_mid_epoch({written['array_record']!r}, "
          "60)), flush=True)")
  child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    out, _ = child.communicate(timeout=600)
  except subprocess.TimeoutExpired:
    os.killpg(child.pid, signal.SIGKILL)
    out, _ = child.communicate()
    pytest.fail(f"the pipeline did not finish 60 drops in 600 s (deadlock?):\n{out[-20000:]}")
  assert child.returncode == 0, out[-3000:]
  result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
  assert result["drops"] >= 60
  assert result["in_flight"] >= 10, result  # the drops did meet reads in flight
