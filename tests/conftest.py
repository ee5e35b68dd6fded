"""Test session set-up.

The whole pytest session runs on 8 fake CPU devices so that sharded and unsharded results can be
compared in one process; XLA reads this flag only when JAX initializes, so it is set here, before
any test module imports JAX. Unsharded code simply runs on device 0.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Many tests compile the same smoke-config step in fresh processes; one persistent compilation
# cache for the session lets each later process load it instead of compiling again.
import tempfile  # noqa: E402

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "sove_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_terminal_summary(terminalreporter):
  """Ends the run by naming every test that did not run and why (an optional package missing,
  say), so a green run that skipped some is never mistaken for a full one."""
  by_reason = {}
  for report in terminalreporter.stats.get("skipped", []):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    by_reason.setdefault(reason.removeprefix("Skipped: "), []).append(report.nodeid)
  if not by_reason:
    return
  count = sum(map(len, by_reason.values()))
  terminalreporter.section(f"{count} test{'s' if count > 1 else ''} did not run")
  for reason, nodeids in by_reason.items():
    terminalreporter.write_line(f"{len(nodeids)} skipped, reason: {reason}")
    for nodeid in nodeids:
      terminalreporter.write_line(f"  {nodeid}")


def pytest_sessionfinish(session, exitstatus):
  """With SOVE_JAX_REQUIRE_ALL_TESTS=1 (CI), a skipped test fails the run: CI's fresh virtualenv
  holds exactly what the README installs, so a skip there is a missing install step."""
  if os.environ.get("SOVE_JAX_REQUIRE_ALL_TESTS") != "1" or exitstatus != 0:
    return
  reporter = session.config.pluginmanager.get_plugin("terminalreporter")
  skipped = reporter.stats.get("skipped", []) if reporter is not None else []
  if skipped:
    reporter.write_line(f"SOVE_JAX_REQUIRE_ALL_TESTS=1: {len(skipped)} test(s) skipped: the run "
                        "fails (see the list above).", red=True)
    session.exitstatus = 1


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
  """One finished smoke run for the session (per pytest worker), trained in process by the real
  trainer: configs/smoke.py, 4 steps, a checkpoint at every step, all kept. Read it as is; a test
  that writes into a run copies it first (`shutil.copytree`)."""
  from configs import smoke
  from sove_jax import train
  config = smoke.get_config()
  config.checkpoint_every, config.keep_checkpoints = 1, 10
  workdir = tmp_path_factory.mktemp("smoke_run") / "run"
  train.train_and_evaluate(config, str(workdir))
  return workdir
