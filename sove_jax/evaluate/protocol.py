"""The evaluation spine: one `run` for every protocol.

Each evaluation (knn, linear, finetune, retrieval, video, pca) is a `Protocol`: its flags, its
`evaluate` of one backbone, its console table and its JSON fields. `run` does the rest the same
way for all of them: check the protocol's inputs (data files, settings) before anything loads,
load the backbone, from a training workdir (the teacher of a checkpoint) or from released
PyTorch weights, evaluate it and the baselines asked for (the run's network before training,
the raw pixels) on the same data, print the table and write `<name>.json` with the checkpoint
step (or the weights file) and the protocol that ran:

    python -m sove_jax.evaluate.NAME --workdir=DIR [--step=N] [flags]
    python -m sove_jax.evaluate.NAME --weights=FILE.pth --arch=vit_small [--checkpoint_key=teacher]

Results go to `--out_dir`: by default the workdir, or beside a weights file in a folder named
after it (`dino_deitsmall16_pretrain.pth` -> `dino_deitsmall16_pretrain/knn.json`).
"""
from __future__ import annotations

import json
from typing import Callable, NamedTuple

import jax
from etils import epath

from sove_jax import configuration, reporting
from sove_jax.evaluate import backbone as backbone_lib
from sove_jax.evaluate import features
from sove_jax.interop import released

BASELINES = ("random_init", "pixels")
BASELINE_NAMES = {"random_init": "random init", "pixels": "raw pixels"}


class Protocol(NamedTuple):
  """One evaluation. `evaluate(loaded, out_dir, **options)` -> results of one backbone
  (`loaded`: `backbone.LoadedBackbone`; for the pixel baseline its backbone is None and
  `apply_fn` gives the features); `table(results, {baseline: results})` -> console text;
  `record(results, options)` -> the JSON fields, "protocol" among them; `check(options)` raises
  one-sentence errors before the backbone loads; `result_name(options)` -> the JSON's name;
  `arm(record)`, when set, keys each run's record in a JSON shared by several runs;
  `baseline_record(results, options)` -> a baseline's JSON fields (default: `record`'s)."""
  name: str
  title: str
  evaluate: Callable[..., dict]
  define_flags: Callable
  options: Callable[..., dict]
  table: Callable[[dict, dict], str]
  record: Callable[[dict, dict], dict]
  check: Callable[[dict], None] = lambda options: None
  result_name: Callable[[dict], str] | None = None
  baselines: tuple = ()
  default_baselines: tuple = ()
  arm: Callable[[dict], str] | None = None
  baseline_record: Callable[[dict, dict], dict] | None = None


class Source(NamedTuple):
  """Where the evaluated backbone comes from: a training workdir (and checkpoint step), or a
  released weights file with its architecture (and the entry of a file that holds several)."""
  workdir: str = ""
  step: int | None = None
  weights: str = ""
  arch: str = ""
  checkpoint_key: str = "teacher"
  trusted: bool = False

  def check(self):
    err = configuration.ConfigError
    if bool(self.workdir) == bool(self.weights):
      raise err("Give the backbone to evaluate: --workdir=DIR (a training run) or "
                "--weights=FILE with --arch (released weights), not both.")
    if self.weights and not self.arch:
      raise err("--weights needs --arch (vit_tiny, vit_small, vit_base or vit_large).")
    if self.weights and self.step is not None:
      raise err("--step names a checkpoint of a --workdir, not of --weights.")
    if self.weights and not epath.Path(self.weights).exists():
      raise FileNotFoundError(f"No weights file {self.weights}.")

  def load(self) -> backbone_lib.LoadedBackbone:
    if self.workdir:
      return backbone_lib.load_backbone(self.workdir, step=self.step, which="teacher")
    return released.load_released(self.weights, arch=self.arch,
                                  checkpoint_key=self.checkpoint_key, trusted=self.trusted)

  def out_dir(self, out_dir: str = "") -> str:
    if out_dir or self.workdir:
      return out_dir or self.workdir
    path = epath.Path(self.weights)
    return str(path.parent / path.name.split(".")[0])

  def describe(self) -> dict:
    if self.workdir:
      return {"workdir": self.workdir}
    return {"weights": self.weights, "arch": self.arch, "checkpoint_key": self.checkpoint_key}


def baseline(name: str, config) -> tuple:
  """(LoadedBackbone, extra evaluate arguments) of a baseline evaluated beside the trained
  network on the same data: "random_init", the run's network before its first step (seed
  `config.seed`); "pixels", no network: the flattened, L2-normalized images."""
  if name == "random_init":
    return backbone_lib.LoadedBackbone(config, backbone_lib.random_backbone(config), None), {}
  if name == "pixels":
    return backbone_lib.LoadedBackbone(config, None, None), {"apply_fn": features.pixel_features()}
  raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")


def _as_loaded(loaded, asked_step) -> backbone_lib.LoadedBackbone:
  """A loader's answer as a LoadedBackbone (a plain (config, backbone) pair names no step)."""
  if isinstance(loaded, backbone_lib.LoadedBackbone):
    return loaded
  config, model = loaded
  return backbone_lib.LoadedBackbone(config, model, backbone_lib.loaded_step(loaded, asked_step))


def run(protocol: Protocol, *, load: Callable, options: dict, out_dir: str, baselines=(),
        source: dict | None = None, step=None) -> dict:
  """Evaluates the backbone `load()` gives, and each of `baselines`, by `protocol`; prints the
  table and writes OUT_DIR/<name>.json (process 0). Returns the trained backbone's results."""
  protocol.check(options)  # the data and settings, before a backbone loads
  loaded = _as_loaded(load(), step)
  results = protocol.evaluate(loaded, out_dir, **options)
  base = {}
  for name in baselines:
    other, extra = baseline(name, loaded.config)
    base[name] = protocol.evaluate(other, out_dir, **extra, **options)
  if jax.process_index() == 0:
    where = (source or {}).get("workdir") or (source or {}).get("weights") or out_dir
    reporting.say(f"{protocol.title} of {where}:\n{protocol.table(results, base)}")
    record = {**protocol.record(results, options),
              "step": "latest" if loaded.step is None and "weights" not in (source or {})
                      else loaded.step,
              **(source or {}),
              "baselines": {b: (protocol.baseline_record or protocol.record)(r, options)
                            for b, r in base.items()}}
    write_record(protocol, out_dir, record, options)
  return results


def write_record(protocol: Protocol, out_dir: str, record: dict, options: dict) -> epath.Path:
  """OUT_DIR/<name>.json: the record, or with `protocol.arm` the record beside those of the
  other arms already there."""
  name = protocol.result_name(options) if protocol.result_name else protocol.name
  path = epath.Path(out_dir) / f"{name}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  if protocol.arm is not None:
    arms = json.loads(path.read_text()) if path.exists() else {}
    arms[protocol.arm(record)] = record
    record = arms
  path.write_text(json.dumps(record, indent=2))
  return path


# --- the command line -----------------------------------------------------------------------------

def define_flags(flags, protocol: Protocol):
  """The flags every evaluation shares (which backbone, where results go, the batch), then the
  protocol's own."""
  reporting.define_verbose_flag(flags)
  flags.DEFINE_string("workdir", None, "Training run directory (checkpoints, config).")
  flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
  flags.DEFINE_string("weights", None, "Released weights to evaluate instead of a workdir: "
                      "FILE.pth or FILE.safetensors in DINO's layout (DINO, iBOT, the authors'"
                      " SOVE), with --arch.")
  flags.DEFINE_string("arch", None, "Architecture of --weights: vit_tiny | vit_small | vit_base "
                      "| vit_large (patch size and image size are read from the file).")
  flags.DEFINE_string("checkpoint_key", "teacher", "Entry of a --weights file that holds "
                      "several (a training checkpoint's teacher or student).")
  flags.DEFINE_bool("trust_pickle", False, "Unpickle arbitrary objects of a --weights .pth "
                    "(only for files you trust).")
  flags.DEFINE_string("out_dir", "", "Where the results go (default: the workdir; for --weights "
                      "a folder named after the file, beside it).")
  flags.DEFINE_integer("batch_size", 0, "Global evaluation batch, a multiple of the device "
                       "count (default: the run's batch for split protocols, 8 per device for "
                       "image files).")
  if protocol.baselines:
    flags.DEFINE_multi_enum("baselines", list(protocol.default_baselines),
                            protocol.baselines + ("none",),
                            "Baselines evaluated on the same data and printed beside the "
                            "trained network (repeatable; none for none).")
  protocol.define_flags(flags)


def source_from_flags(f) -> Source:
  source = Source(workdir=f.workdir or "", step=f.step, weights=f.weights or "",
                  arch=f.arch or "", checkpoint_key=f.checkpoint_key, trusted=f.trust_pickle)
  source.check()
  return source


def command(protocol: Protocol, argv):
  """The `main(argv)` of `python -m sove_jax.evaluate.<protocol>`."""
  from absl import flags
  del argv
  f = flags.FLAGS
  source = source_from_flags(f)
  options = protocol.options(f)
  baselines = [b for b in getattr(f, "baselines", None) or () if b != "none"]
  run(protocol, load=source.load, options=options, out_dir=source.out_dir(f.out_dir),
      baselines=baselines, source=source.describe(), step=f.step)


def main(protocol: Protocol):
  """Defines the flags and runs `command` as an absl app, expected failures in one line."""
  import functools

  from absl import app, flags
  define_flags(flags, protocol)
  app.run(reporting.command(functools.partial(command, protocol)))
