"""Where metrics go: a console progress line, metrics.jsonl, and TensorBoard event files.

The event files are written directly (TFRecord framing around hand-encoded `Event` protos), so
logging needs neither TensorFlow nor tensorboard in the training process.
"""
import json
import os
import socket
import struct
import sys
import time

# --- TFRecord / Event encoding ------------------------------------------------------------------

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    bits = n & 0x7F
    n >>= 7
    out.append(bits | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
  return _varint((number << 3) | wire) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
  return _field(number, 2, _varint(len(data)) + data)


def encode_event(wall_time: float, step: int, scalars=None, file_version=None) -> bytes:
  """An `Event` proto: wall_time (1), step (2), file_version (3) or summary (5) of scalars."""
  msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(int(step)))
  if file_version is not None:
    msg += _bytes_field(3, file_version.encode())
  if scalars:
    values = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", v)))
        for tag, v in scalars.items())
    msg += _bytes_field(5, values)
  return msg


def tfrecord(data: bytes) -> bytes:
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


class MetricWriter:
  """Scalars to metrics.jsonl and to a TensorBoard event file in `workdir` (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self._events = open(os.path.join(workdir, name), "ab")
    self._events.write(tfrecord(encode_event(time.time(), 0, file_version="brain.Event:2")))

  def write(self, step: int, scalars: dict):
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    self._events.write(tfrecord(encode_event(time.time(), step, scalars)))
    self._events.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._events.close()


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, metrics: dict, images_per_sec: float,
                  eta_seconds: float) -> str:
  return (f"step {step:>{len(str(total))}}/{total} | loss {metrics['loss']:.4f} "
          f"(cls {metrics['cls_loss']:.4f} patch {metrics['patch_loss']:.4f}) | "
          f"lr {metrics['learning_rate']:.2e} | {images_per_sec:,.0f} img/s | "
          f"ETA {_duration(eta_seconds)}")


def say(text: str):
  """One console line from process 0."""
  import jax
  if jax.process_index() == 0:
    print(text, file=sys.stdout, flush=True)
