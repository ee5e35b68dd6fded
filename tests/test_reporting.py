"""Metrics through CLU writers: metrics.jsonl and TensorBoard files that TensorBoard reads; the
logging window's means; the console's lines and its quiet default."""
import json
import logging as python_logging

from absl import logging

from sove_jax import reporting


def test_writer_gives_jsonl_and_tensorboard_files_that_tensorboard_reads(tmp_path):
  """TensorBoard is a dependency (what `tensorboard --logdir WORKDIR` needs): its own reader
  finds every scalar and the config as hparams."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.plugins.hparams import plugin_data_pb2
  from tensorboard.util import tensor_util

  writer = reporting.open_writer(str(tmp_path), enabled=True)
  writer.write_hparams({"batch_size": 16, "optim": {"base_lr": 1e-3}, "sizes": (28, 14)})
  writer.write_scalars(3, {"train/loss": 1.5, "perf/steps_per_sec": 2.0})
  writer.write_scalars(6, {"train/loss": 1.25, "knn/top1_k20": 70.5})
  writer.close()
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert lines == [{"step": 3, "train/loss": 1.5, "perf/steps_per_sec": 2.0},
                   {"step": 6, "train/loss": 1.25, "knn/top1_k20": 70.5}]
  events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
  events.Reload()
  tags = events.Tags()["tensors"]
  assert {"train/loss", "perf/steps_per_sec", "knn/top1_k20"} <= set(tags)
  loss = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
          for e in events.Tensors("train/loss")]
  assert loss == [(3, 1.5), (6, 1.25)]
  (content,) = events.PluginTagToContent("hparams").values()
  hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
  assert set(hparams) == {"batch_size", "optim.base_lr", "sizes.0", "sizes.1"}


def test_other_processes_write_nothing(tmp_path):
  writer = reporting.open_writer(str(tmp_path / "w"), enabled=False)
  writer.write_scalars(1, {"train/loss": 1.0})
  writer.close()
  assert not (tmp_path / "w").exists()


def test_window_averages_measurements_and_keeps_the_last_schedule_values():
  window = reporting.Window(last=("learning_rate",))
  window.add({"loss": 3.0, "grad_norm": 1.0, "learning_rate": 0.1})
  window.add({"loss": 1.0, "grad_norm": 2.0, "learning_rate": 0.2})
  assert len(window) == 2
  assert window.pop() == {"train/loss": 2.0, "train/grad_norm": 1.5, "train/learning_rate": 0.2}
  window.add({"loss": 5.0, "learning_rate": 0.3})
  assert window.pop() == {"train/loss": 5.0, "train/learning_rate": 0.3}


def test_progress_line_has_throughput_and_eta_once_measured():
  scalars = {"train/loss": 2.0, "train/cls_loss": 1.5, "train/patch_loss": 0.5,
             "train/learning_rate": 1e-4}
  assert reporting.progress_line(1, 200, scalars) == (
      "step   1/200 | loss 2.0000 (cls 1.5000 patch 0.5000) | lr 1.00e-04")
  scalars.update({"perf/steps_per_sec": 2.0, "perf/images_per_sec": 1234.0})
  line = reporting.progress_line(50, 200, scalars)
  assert line.endswith("| 1,234 img/s | ETA 1m15s"), line
  del scalars["perf/steps_per_sec"], scalars["perf/images_per_sec"]
  del scalars["train/patch_loss"]   # a [CLS]-only run (patch weight 0) computes no patch loss
  assert reporting.progress_line(1, 200, scalars) == (
      "step   1/200 | loss 2.0000 (cls 1.5000) | lr 1.00e-04")
  del scalars["train/cls_loss"]
  assert reporting.progress_line(1, 200, scalars) == "step   1/200 | loss 2.0000 | lr 1.00e-04"
  assert reporting.knn_line(250, {"knn/top1_k20": 67.25, "knn/top1_k10": 68.0}) == (
      "k-NN top-1 at step 250: k=10 68.00 | k=20 67.25")


def _record(level, pathname):
  return python_logging.LogRecord("absl", level, pathname, 1, "message", None, None)


def test_console_shows_our_lines_and_warnings_and_library_detail_only_when_verbose():
  handler = logging.get_absl_handler().python_handler
  ours = reporting.__file__
  library = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  try:
    reporting.configure_console(verbose=False)
    assert handler.filter(_record(python_logging.INFO, ours))
    assert handler.filter(_record(python_logging.WARNING, library))
    assert not handler.filter(_record(python_logging.INFO, library))
    assert handler.format(_record(python_logging.INFO, ours)).endswith(" message")
    reporting.configure_console(verbose=True)
    assert handler.filter(_record(python_logging.INFO, library))
  finally:
    reporting.configure_console(verbose=True)  # as absl left it for the other tests


def test_console_leaves_a_failed_save_to_its_one_line():
  """A save whose folder vanishes fails in Orbax's write tasks: Orbax's own errors and asyncio's
  "never retrieved" report of each task stay off the console (the run says it in one line); any
  other asyncio error still shows."""
  handler = logging.get_absl_handler().python_handler
  asyncio_file = "/usr/lib/python3.11/asyncio/base_events.py"

  def from_asyncio(message):
    return python_logging.LogRecord("asyncio", python_logging.ERROR, asyncio_file, 1771, message,
                                    None, None)
  orbax_task = ("Task exception was never retrieved\nfuture: <Task finished coro=<write_fragment()"
                " defined at /site-packages/orbax/checkpoint/_src/serialization/serialization.py"
                ":188> exception=ValueError('NOT_FOUND')>")
  try:
    reporting.configure_console(verbose=False)
    assert not handler.filter(from_asyncio(orbax_task))
    assert not handler.filter(_record(python_logging.ERROR, "/site-packages/orbax/x.py"))
    assert handler.filter(from_asyncio("Task exception was never retrieved\nfuture: <Task "
                                       "coro=<main() defined at /work/run.py:3>>"))
    assert handler.filter(_record(python_logging.ERROR, reporting.__file__))
  finally:
    reporting.configure_console(verbose=True)  # as absl left it for the other tests
