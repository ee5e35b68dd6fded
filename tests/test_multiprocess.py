"""A real two-process run on this machine: jax.distributed with a localhost coordinator."""
import json
import os
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(workdir, steps):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_worker.py"),
                             str(port), str(i), str(workdir), str(steps)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
           for i in range(2)]
  outs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return [json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
          for out in outs], outs


def test_two_processes_train_agree_save_and_restore(tmp_path):
  results, outs = _launch(tmp_path, 3)
  a, b = results
  assert a["devices"] == b["devices"] == 4
  assert a["step"] == b["step"] == 3
  assert a["loss"] == b["loss"]
  for key in ("class_bank", "patch_bank", "teacher"):
    assert a[key] == b[key], key
  # Each process reads its own part of the input, so their positions are their own.
  assert "step 3/3" in outs[0]
  # A second launch resumes from the saved step and continues.
  results, outs = _launch(tmp_path, 5)
  assert all(r["step"] == 5 for r in results)
  assert "resumed from step 3" in outs[0]
  assert results[0]["class_bank"] == results[1]["class_bank"]
