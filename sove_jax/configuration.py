"""Config files and config checks, in one place, run before anything is traced or compiled.

Each mistake stops the run with one sentence that names the field, its value and the fix.
Config files are loaded by path: a variant loads the file it builds on from its own folder
(`sibling`), so every config works from any working directory.
"""
import importlib.util
import pathlib


class ConfigError(ValueError):
  """A config value that cannot work; the message is meant for the user as it is."""


VARIANTS = ("ti", "s", "b", "l")
DTYPES = ("bfloat16", "float32", "float16")


def sibling(name: str, *, of: str):
  """The config module `name` from the folder of the file `of` (a config's `__file__`).

  Loaded by path, not imported as `configs.NAME`: that import works only when the repository
  root is on `sys.path` (running from the root), this works wherever the run starts.
  """
  path = pathlib.Path(of).resolve().with_name(f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"sove_jax_config_{name}", path)
  if spec is None or not path.is_file():
    raise FileNotFoundError(f"No config {name!r} beside {of}: {path} does not exist.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(path: str):
  """`get_config()` of the config file at `path` (what `--config=PATH` gives)."""
  return sibling(pathlib.Path(path).stem, of=str(path)).get_config()


def _require(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def _one_of(value, allowed, field: str):
  _require(value in allowed, f"{field}={value!r} is not one of {', '.join(map(repr, allowed))}.")


def validate(config, *, num_devices: int, process_count: int = 1):
  """Raises ConfigError on the first problem found."""
  m, s, o, d = config.model, config.sove, config.optim, config.data
  _one_of(m.variant, VARIANTS, "model.variant")
  _one_of(m.dtype, DTYPES, "model.dtype")
  _one_of(s.labels, ("soft", "onehot"), "sove.labels")
  _one_of(o.clip_mode, ("per_tensor", "global"), "optim.clip_mode")
  _one_of(d.mask_type, ("block", "random"), "data.mask_type")
  _one_of(d.source, ("fashion_mnist", "tfds", "folder"), "data.source")
  _one_of(m.get("attention", "xla"), ("xla", "cudnn"), "model.attention")

  b = config.batch_size
  _require(b > 0 and b % num_devices == 0,
           f"batch_size={b} must be a positive multiple of the {num_devices} devices.")
  _require(b % process_count == 0,
           f"batch_size={b} must be divisible by the {process_count} processes.")
  _require(m.width % m.num_heads == 0,
           f"model.width={m.width} must be divisible by model.num_heads={m.num_heads}.")
  for field in ("global_size", "local_size"):
    size = d[field]
    _require(size > 0 and size % m.patch_size == 0,
             f"data.{field}={size} must be a positive multiple of model.patch_size={m.patch_size}.")
  _require(d.num_local >= 0, f"data.num_local={d.num_local} must be >= 0.")
  _require(0.0 <= d.mask_ratio < 1.0, f"data.mask_ratio={d.mask_ratio} must be in [0, 1).")
  _require(config.num_epochs > 0 or config.total_steps > 0,
           "Set num_epochs > 0 or total_steps > 0: the run has no length.")

  for bank, anchors, neighbors, tasks in (
      ("class_bank_size", "num_anchors", "num_neighbors", "class_tasks"),
      ("patch_bank_size", "patch_anchors", "patch_neighbors", "patch_tasks")):
    size, k_a, k_n = s[bank], s[anchors], s[neighbors]
    _require(size >= b, f"sove.{bank}={size} must hold at least one global batch ({b}).")
    _require(0 < k_a <= size,
             f"sove.{anchors}={k_a} must be in [1, sove.{bank}={size}]: more anchors than the "
             "bank holds.")
    _require(0 <= k_n <= size - k_a,
             f"sove.{neighbors}={k_n} must be <= sove.{bank} - sove.{anchors} = {size - k_a}: "
             "neighbours are searched among the non-anchor rows.")
    _require(s[tasks] >= 1, f"sove.{tasks}={s[tasks]} must be >= 1.")
  _require(0.0 < s.anchor_keep <= 1.0, f"sove.anchor_keep={s.anchor_keep} must be in (0, 1].")
  _require(0.0 <= s.smoothing < 1.0, f"sove.smoothing={s.smoothing} must be in [0, 1).")
  for field in ("student_temp", "teacher_temp", "teacher_temp_warmup"):
    _require(s[field] > 0, f"sove.{field}={s[field]} must be > 0.")
  _require(s.judge_chunk > 0 and s.judge_chunk % num_devices == 0,
           f"sove.judge_chunk={s.judge_chunk} must be a positive multiple of the {num_devices} "
           "devices (each device searches a share of every chunk of anchors).")
  _require(o.base_lr > 0, f"optim.base_lr={o.base_lr} must be > 0.")
  _require(0.0 <= o.ema_momentum <= 1.0 and 0.0 <= o.ema_momentum_end <= 1.0,
           "optim.ema_momentum and optim.ema_momentum_end must be in [0, 1].")
  fsdp = config.mesh.fsdp
  _require(fsdp >= 1 and num_devices % fsdp == 0,
           f"mesh.fsdp={fsdp} must divide the {num_devices} devices.")
