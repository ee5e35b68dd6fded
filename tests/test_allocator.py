"""The entry point runs under tcmalloc where it is installed: it re-executes itself once with
tcmalloc preloaded, keeps its arguments, and leaves alone a process that has it or opted out
(SOVE_JAX_ALLOCATOR=system)."""
import os
import subprocess
import sys

import pytest

from sove_jax import allocator


def _reexec(monkeypatch, env, library="libtcmalloc_minimal.so.4"):
  calls = []
  for k in ("LD_PRELOAD", allocator.ENV):
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "sove_jax.main", "--config=c.py"])
  allocator.reexec_with_tcmalloc(find=lambda: library,
                                 execve=lambda *args: calls.append(args))
  return calls


@pytest.mark.parametrize("asked", [None, "tcmalloc"])   # by default, and by name
def test_reexecutes_itself_once_with_tcmalloc_preloaded(monkeypatch, asked):
  (call,) = _reexec(monkeypatch, {"LD_PRELOAD": "libother.so",
                                  **({allocator.ENV: asked} if asked else {})})
  path, argv, env = call
  assert path == sys.executable
  assert argv == [sys.executable, "-m", "sove_jax.main", "--config=c.py"]   # same command
  assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libother.so"      # others kept
  assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40


@pytest.mark.parametrize("env, library", [
    ({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}, "libtcmalloc_minimal.so.4"),  # done
    ({allocator.ENV: "system"}, "libtcmalloc_minimal.so.4"),                          # opted out
    ({}, None),                                                                       # absent
])
def test_leaves_the_process_alone(monkeypatch, env, library):
  assert _reexec(monkeypatch, env, library) == []


@pytest.mark.skipif(not allocator.tcmalloc_library(), reason="tcmalloc is not installed")
def test_a_real_reexecution_loads_tcmalloc():
  code = ("import sys; from sove_jax import allocator; allocator.reexec_with_tcmalloc(); "
          "print(allocator.in_use(), sys.argv[1:])")
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV)}
  before = subprocess.run([sys.executable, "-c", "from sove_jax import allocator; "
                           "print(allocator.in_use())"], env=env, capture_output=True, text=True)
  assert before.stdout.split() == ["system"]
  after = subprocess.run([sys.executable, "-c", code, "a", "--b=1"], env=env,
                         capture_output=True, text=True, timeout=60)
  assert after.returncode == 0, after.stderr
  assert after.stdout.strip() == "tcmalloc ['a', '--b=1']"
  kept = subprocess.run([sys.executable, "-c", code], env={**env, allocator.ENV: "system"},
                        capture_output=True, text=True, timeout=60)
  assert kept.stdout.strip() == "system []"
