"""Where a run's progress and metrics go: the console, metrics.jsonl and TensorBoard.

- The console is absl logging. `configure_console` keeps it readable: our lines and every
  warning, and the libraries' INFO detail (Orbax saves and restores, CLU, optax) only when asked
  for (`--verbose`).
- Metrics go through CLU metric writers: TensorBoard event files (hparams included) and
  `metrics.jsonl`, one JSON line per logged step, both in the workdir and written by process 0.
  Names carry their family: `train/` (the step's metrics, averaged over the logging window),
  `perf/` (throughput, from CLU's `ReportProgress`) and `knn/` (the k-NN monitor).
- CLU's writers import TensorFlow, so `open_writer` imports them when the training process opens
  its writer, after the input pipeline (`sove_jax.data`) has hidden the GPUs from TensorFlow;
  importing this module imports neither.
"""
import functools
import json
import logging as python_logging
import os
import sys

import jax
from absl import logging
from etils import epath

METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics.superseded.jsonl"  # lines of steps a resumed run took again
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


# --- console -------------------------------------------------------------------------------------

def say(text: str):
  """One console line from process 0 (absl INFO)."""
  if jax.process_index() == 0:
    logging.info(text)


class _OursAndWarnings(python_logging.Filter):
  """Passes warnings and errors from anywhere, INFO lines only from sove_jax. Orbax's errors
  (a failed save, with tracebacks) are left to the one line `checkpoint.CheckpointError` says,
  and so are asyncio's reports of Orbax's write tasks whose failure nobody collected (a save
  whose folder vanished leaves one per array being written)."""

  def filter(self, record):
    if record.levelno >= python_logging.ERROR and (
        "/orbax/" in record.pathname
        or (record.name == "asyncio" and "/orbax/" in record.getMessage())):
      return False
    return record.levelno >= python_logging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


def _quiet_unraisable(unraisable):
  """After a failed background save, tensorstore's callbacks find Orbax's event loop closed,
  each printing a traceback; the failure itself is reported once (`checkpoint`)."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    return
  sys.__unraisablehook__(unraisable)


class _ConsoleFormatter(python_logging.Formatter):
  """`HH:MM:SS message`, with the level and the logger's file named for anything but INFO."""

  def format(self, record):
    when = self.formatTime(record, "%H:%M:%S")
    if record.levelno == python_logging.INFO:
      return f"{when} {record.getMessage()}"
    return f"{when} {record.levelname} {record.filename}:{record.lineno}] {record.getMessage()}"


def configure_console(verbose: bool = False):
  """The console of a run: quiet and short by default; absl's full lines, libraries' INFO
  included, when `verbose`. Call once, after absl has parsed the flags."""
  handler = logging.get_absl_handler().python_handler
  for old in [f for f in handler.filters if isinstance(f, _OursAndWarnings)]:
    handler.removeFilter(old)
  if verbose:
    handler.setFormatter(logging.PythonFormatter())
    sys.unraisablehook = sys.__unraisablehook__
  else:
    handler.addFilter(_OursAndWarnings())
    handler.setFormatter(_ConsoleFormatter())
    sys.unraisablehook = _quiet_unraisable


# --- commands: expected failures in one line ----------------------------------------------------

def expected_errors() -> tuple:
  """What a user can cause or fix (bad config, data or paths, storage, a diverged run, a
  missing package): one line and exit code 1. Anything else is a bug: its traceback shows."""
  from sove_jax import checkpoint, configuration, hosts
  expected = (configuration.ConfigError, checkpoint.CheckpointError, hosts.RunStopped,
              FloatingPointError, ValueError, OSError, ImportError)
  tf = sys.modules.get("tensorflow")
  if tf is not None:
    expected += (tf.errors.OpError,)
  return expected


def error_line(error: BaseException) -> str:
  """An expected failure as the line a user reads."""
  from sove_jax import configuration
  text = str(error).strip() or type(error).__name__
  if isinstance(error, configuration.ConfigError):
    return f"Config error: {text}"
  if isinstance(error, (OSError, ImportError)) and not text.endswith("."):
    return f"{text} ({type(error).__name__})"
  return text


def fail(error: BaseException, *, verbose: bool):
  """Ends the process after an expected failure: the error's line (the traceback first with
  `verbose`) and exit code 1. After a failed checkpoint save the process ends at once:
  Orbax's background threads may otherwise hold it for minutes."""
  from sove_jax import checkpoint
  if verbose:
    logging.error("Traceback of the failure below:", exc_info=error)
  logging.error("%s", error_line(error))
  if isinstance(error, checkpoint.CheckpointError):
    logging.flush()
    for stream in (sys.stdout, sys.stderr):
      stream.flush()
    os._exit(1)
  sys.exit(1)


def command(main):
  """`main(argv)` of an absl command: the console configured (`--verbose` where the command
  defines it), TensorFlow's C++ lines quiet unless verbose, and expected failures in one line
  with exit code 1 (`fail`)."""

  @functools.wraps(main)
  def run(argv):
    from absl import flags
    verbose = bool(flags.FLAGS["verbose"].value) if "verbose" in flags.FLAGS else False
    if not verbose:
      os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    configure_console(verbose=verbose)
    try:
      return main(argv)
    except expected_errors() as e:
      fail(e, verbose=verbose)
    except KeyboardInterrupt as e:  # a second Ctrl-C (sove_jax.hosts.StopSignals): one line
      if verbose:
        logging.error("Traceback of the interruption below:", exc_info=e)
      logging.error("%s", str(e) or "interrupted")
      logging.flush()
      sys.exit(130)

  return run


def define_verbose_flag(flags):
  flags.DEFINE_bool("verbose", False, "Show tracebacks of failures and the libraries' INFO "
                    "lines (Orbax, CLU, TensorFlow); by default a failure is one line.")


def duration(seconds: float) -> str:
  """`1h02m`, `4m07s`."""
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def progress_line(step: int, total: int, scalars: dict) -> str:
  """`step 400/749 | loss 10.0089 (cls 6.0468 patch 3.9621) | lr 3.09e-04 | 166 img/s | ETA
  4m47s`; throughput and ETA when `scalars` holds a `perf/` measurement. A loss a run does not
  compute (a weight of 0: [CLS] only, MIM only, DINO) is left out of the parentheses."""
  parts = " ".join(f"{name} {scalars[key]:.4f}" for name, key in
                   (("cls", "train/cls_loss"), ("patch", "train/patch_loss")) if key in scalars)
  line = (f"step {step:>{len(str(total))}}/{total} | loss {scalars['train/loss']:.4f} "
          + (f"({parts}) " if parts else "") + f"| lr {scalars['train/learning_rate']:.2e}")
  if "perf/steps_per_sec" in scalars:
    eta = (total - step) / max(scalars["perf/steps_per_sec"], 1e-9)
    line += f" | {scalars['perf/images_per_sec']:,.0f} img/s | ETA {duration(eta)}"
  return line


def knn_line(step: int, scalars: dict) -> str:
  """`k-NN top-1 at step 250: k=10 68.25 | k=20 67.25 ...` from `knn/top1_k{k}` scalars."""
  accuracies = sorted((int(k.rsplit("_k", 1)[1]), v) for k, v in scalars.items()
                      if k.startswith("knn/top1_k"))
  return f"k-NN top-1 at step {step}: " + " | ".join(f"k={k} {v:.2f}" for k, v in accuracies)


# --- the logging window --------------------------------------------------------------------------

class Window:
  """The step metrics between two logged steps: measurements are averaged, schedule values
  (`last`) are those of the window's last step; all are named `train/...`."""

  def __init__(self, last=()):
    self._last_names = frozenset(last)
    self._sums, self._last, self._count = {}, {}, 0

  def add(self, metrics: dict):
    for name, value in metrics.items():
      if name in self._last_names:
        self._last[name] = float(value)
      else:
        self._sums[name] = self._sums.get(name, 0.0) + float(value)
    self._count += 1

  def __len__(self):
    return self._count

  def pop(self) -> dict:
    """The window's `train/` scalars; the window starts again empty."""
    out = {f"train/{k}": v / max(self._count, 1) for k, v in self._sums.items()}
    out.update({f"train/{k}": v for k, v in self._last.items()})
    self._sums, self._last, self._count = {}, {}, 0
    return out


# --- metric writers ------------------------------------------------------------------------------

class JsonlWriter:
  """metrics.jsonl: one line `{"step": N, name: value, ...}` per `write_scalars`, flushed at once,
  through epath (local or bucket paths). Implements the parts of CLU's `MetricWriter` that the
  trainer uses; the rest are ignored."""

  def __init__(self, path):
    self._file = epath.Path(path).open("a")

  def write_scalars(self, step: int, scalars):
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def write_hparams(self, hparams):
    del hparams  # config.json holds them

  def _ignore(self, *args, **kwargs):
    del args, kwargs

  write_summaries = write_images = write_videos = write_audios = _ignore
  write_texts = write_histograms = _ignore

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def drop_metrics_after(workdir, step: int):
  """Before a run (re)starts at `step`: lines of metrics.jsonl for later steps (logged before a
  kill or preemption, about to be logged again) move to metrics.superseded.jsonl, so that each
  step is in metrics.jsonl once. An unreadable line (cut by a kill) moves too."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return
  keep, drop = [], []
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    try:
      later = int(json.loads(line)["step"]) > step
    except (ValueError, KeyError, TypeError):
      later = True
    (drop if later else keep).append(line)
  if not drop:
    return
  superseded = epath.Path(workdir) / SUPERSEDED_FILE
  old = superseded.read_text() if superseded.exists() else ""
  superseded.write_text(old + "".join(line + "\n" for line in drop))
  tmp = epath.Path(workdir) / (METRICS_FILE + ".tmp")
  tmp.write_text("".join(line + "\n" for line in keep))
  tmp.replace(path)


class Collector:
  """A CLU writer that keeps what it is given under `prefix`, for the trainer to pick up (CLU's
  ReportProgress measures; the trainer writes every family of a step in one line)."""

  def __init__(self, prefix: str):
    self.prefix, self.scalars = prefix, {}

  def write_scalars(self, step: int, scalars):
    del step
    self.scalars.update({self.prefix + k: float(v) for k, v in scalars.items()})

  def pop(self) -> dict:
    out, self.scalars = self.scalars, {}
    return out


def open_writer(workdir: str, *, enabled: bool):
  """TensorBoard event files and metrics.jsonl in `workdir` (written in a background thread)
  when `enabled` (process 0), else a writer that writes nothing. Imports TensorFlow."""
  from clu import metric_writers

  from sove_jax import data  # noqa: F401  TensorFlow enters here, with the GPUs hidden from it

  if not enabled:
    return metric_writers.MultiWriter([])
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  return metric_writers.AsyncMultiWriter([
      metric_writers.SummaryWriter(os.fspath(workdir)),
      JsonlWriter(epath.Path(workdir) / METRICS_FILE),
  ])
