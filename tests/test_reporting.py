"""The hand-written TensorBoard event files must be readable by TensorFlow's own reader."""
import glob
import json
import os

import pytest

from sove_jax import reporting


def test_crc32c_known_vector():
  assert reporting.crc32c(b"123456789") == 0xE3069283


def test_events_and_jsonl_round_trip(tmp_path):
  tf = pytest.importorskip("tensorflow")
  w = reporting.MetricWriter(str(tmp_path))
  w.write(3, {"loss": 1.5, "learning_rate": 1e-3})
  w.write(6, {"loss": 1.25})
  w.close()
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert lines == [{"step": 3, "loss": 1.5, "learning_rate": 1e-3}, {"step": 6, "loss": 1.25}]
  (path,) = glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
  seen = []
  for raw in tf.data.TFRecordDataset(path):  # verifies the length and data CRCs
    event = tf.compat.v1.Event.FromString(raw.numpy())
    for v in event.summary.value:
      seen.append((event.step, v.tag, round(v.simple_value, 6)))
  assert seen == [(3, "loss", 1.5), (3, "learning_rate", 0.001), (6, "loss", 1.25)]


def test_progress_line_has_eta_and_throughput():
  line = reporting.progress_line(10, 200, {"loss": 2.0, "cls_loss": 1.5, "patch_loss": 0.5,
                                           "learning_rate": 1e-4}, 1234.0, 75.0)
  assert "step  10/200" in line and "1,234 img/s" in line and "ETA 1m15s" in line
