"""Config files and config checks, in one place, run before anything is traced or compiled.

Each mistake stops the run with one sentence that names the field, its value and the fix.
Config files are loaded by path: a variant loads the file it builds on from its own folder
(`sibling`), so every config works from any working directory.
"""
import importlib.util
import math
import pathlib


class ConfigError(ValueError):
  """A config value that cannot work; the message is meant for the user as it is."""


VARIANTS = ("ti", "s", "b", "l")  # sove_jax.models.vit.VARIANTS' names
DTYPES = ("bfloat16", "float32", "float16")
SOURCES = ("fashion_mnist", "tfds", "folder")
IN_MEMORY_SOURCES = ("fashion_mnist",)  # decoded arrays in memory; the others are encoded files
AUGMENTS = ("host", "device")
# sove_jax.data.masking.MASK_TYPES and EXACT_MIN_PATCHES, spelled out: config checks run before
# (and without) TensorFlow.
MASK_TYPES = ("block", "block_exact", "random")
EXACT_MIN_PATCHES = 4
ATTENTIONS = ("xla", "cudnn")


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


def _pair(value, field: str, low=-math.inf, high=math.inf):
  _require(len(value) == 2 and low <= value[0] <= value[1] <= high,
           f"data.{field} must be (low, high) with {low} <= low <= high <= {high}, "
           f"got {tuple(value)}.")


def _probability(p, field: str):
  _require(0.0 <= p <= 1.0, f"data.{field} must be a probability in [0, 1], got {p}.")


def validate_data(d, *, patch_size: int, global_batch_size: int, process_count: int = 1):
  """The `data` block's checks (also run by the input pipeline alone); touches no files."""
  _one_of(d.source, SOURCES, "data.source")
  _require(d.source != "tfds" or d.name,
           "data.source='tfds' needs data.name, the TFDS dataset name (e.g. 'imagenet2012').")
  _require(d.source != "folder" or d.data_dir,
           "data.source='folder' needs data.data_dir, the folder holding <split>/<class>/ images.")
  _one_of(d.augment, AUGMENTS, "data.augment")
  _require(d.canvas_size >= 0, f"data.canvas_size={d.canvas_size} must be >= 0.")
  if d.augment == "device":
    if d.source in IN_MEMORY_SOURCES:
      _require(d.canvas_size == 0,
               f"data.canvas_size={d.canvas_size} must be 0 for data.source={d.source!r}: "
               "in-memory images live on the device as they are, each its own canvas.")
    else:
      _require(d.canvas_size > 0,
               f"data.augment='device' with data.source={d.source!r} needs data.canvas_size > 0, "
               "the side of the square canvas each decoded image is fitted into (e.g. 512).")
      _require(d.canvas_size >= d.global_size,
               f"data.canvas_size={d.canvas_size} must be >= data.global_size={d.global_size}: "
               "a smaller canvas would upsample every global view.")
  b = global_batch_size
  _require(b > 0 and process_count > 0 and b % process_count == 0,
           f"batch_size={b} must be a positive multiple of the {process_count} processes.")
  _require(d.num_local >= 0, f"data.num_local={d.num_local} must be >= 0.")
  for field in ("global_size", "local_size", "eval_crop"):
    size = d[field]
    _require(size > 0 and size % patch_size == 0,
             f"data.{field}={size} must be a positive multiple of model.patch_size={patch_size}.")
  _require(d.eval_resize >= d.eval_crop,
           f"data.eval_resize={d.eval_resize} must be >= data.eval_crop={d.eval_crop}.")
  _pair(d.global_scale, "global_scale", 1e-6, 1.0)
  _pair(d.local_scale, "local_scale", 1e-6, 1.0)
  _pair(d.aspect_ratio, "aspect_ratio", 1e-6)
  _pair(d.blur_sigma, "blur_sigma", 1e-6)
  for field in ("color_jitter_prob", "grayscale_prob"):
    _probability(d[field], field)
  for field in ("blur_prob", "solarize_prob"):
    _require(len(d[field]) == 3,
             f"data.{field} needs 3 probabilities (global 1, global 2, locals).")
    for p in d[field]:
      _probability(p, field)
  _require(len(d.color_jitter) == 4 and min(d.color_jitter) >= 0 and d.color_jitter[3] <= 0.5,
           "data.color_jitter must be 4 values >= 0 (brightness, contrast, saturation, "
           f"hue <= 0.5), got {tuple(d.color_jitter)}.")
  _require(len(d.mean) == 3 and len(d.std) == 3 and min(d.std) > 0,
           "data.mean and data.std need 3 values each, std > 0.")
  _one_of(d.mask_type, MASK_TYPES, "data.mask_type")
  _require(0.0 <= d.mask_ratio < 1.0, f"data.mask_ratio={d.mask_ratio} must be in [0, 1).")
  low, high = d.mask_ratio - d.mask_ratio_var, d.mask_ratio + d.mask_ratio_var
  _require(d.mask_ratio_var >= 0 and low >= 0 and high <= 1,
           f"data.mask_ratio +- data.mask_ratio_var must stay in [0, 1], got [{low}, {high}].")
  side = d.global_size // patch_size
  num_patches = side * side
  _require(0 <= d.mask_min_patches <= num_patches,
           f"data.mask_min_patches={d.mask_min_patches} must be in [0, {num_patches}] "
           f"({side}x{side} patches; 0 = the mask type's own minimum).")
  if d.mask_type == "block_exact":
    smallest = d.mask_min_patches or EXACT_MIN_PATCHES
    fewest = math.floor(low * num_patches + 0.5)  # data.masking.masked_count
    _require(not 0 < fewest < smallest,
             f"Exact block masks need >= {smallest} patches (data.mask_min_patches) but ratio "
             f"{low:.3g} of {num_patches} patches masks only {fewest}.")
  _require(d.shuffle_buffer >= 1 and d.prefetch >= 0 and d.threads >= 0,
           "data.shuffle_buffer must be >= 1, data.prefetch and data.threads >= 0.")


def validate(config, *, num_devices: int, process_count: int = 1):
  """Raises ConfigError on the first problem found."""
  m, s, o = config.model, config.sove, config.optim
  _one_of(m.variant, VARIANTS, "model.variant")
  _one_of(m.dtype, DTYPES, "model.dtype")
  _one_of(s.labels, ("soft", "onehot"), "sove.labels")
  _one_of(o.clip_mode, ("per_tensor", "global"), "optim.clip_mode")
  _one_of(m.attention, ATTENTIONS, "model.attention")
  from sove_jax.models import network, vit  # the model's own size rules (no TensorFlow)
  _one_of(m.pos_interpolation, vit.POS_INTERPOLATIONS, "model.pos_interpolation")

  b = config.batch_size
  _require(b > 0 and b % num_devices == 0,
           f"batch_size={b} must be a positive multiple of the {num_devices} devices.")
  validate_data(config.data, patch_size=m.patch_size, global_batch_size=b,
                process_count=process_count)
  for field in ("width", "depth", "num_heads"):
    _require(m[field] >= 0, f"model.{field}={m[field]} must be >= 0 (0: model.variant's).")
  width, _, heads = network.vit_size(m)
  _require(width % heads == 0,
           f"The ViT width {width} must be divisible by its {heads} heads (model.variant="
           f"{m.variant!r}, model.width={m.width}, model.num_heads={m.num_heads}).")
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
             "neighbors are searched among the non-anchor rows.")
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
  rules = config.mesh.rules
  _require(all(len(rule) == 2 and all(isinstance(name, str) for name in rule) for rule in rules),
           f"mesh.rules={rules!r} must be (logical axis, mesh axis) pairs of names.")
  _require(0.0 <= config.mesh.max_replicated <= 1.0,
           f"mesh.max_replicated={config.mesh.max_replicated} must be in [0, 1].")
