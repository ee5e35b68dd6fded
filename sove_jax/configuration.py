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


DTYPES = ("bfloat16", "float32", "float16")
SOURCES = ("fashion_mnist", "tfds", "folder")
IN_MEMORY_SOURCES = ("fashion_mnist",)  # decoded arrays in memory; the others are encoded files
AUGMENTS = ("host", "device")
# The mask rules (sove_jax.masks on the device, sove_jax.data.masking on the host, both take
# these from here): config checks run before (and without) TensorFlow and JAX.
MASK_TYPES = ("block", "block_exact", "random")
EXACT_MIN_PATCHES = 4  # smallest block of "block_exact" when data.mask_min_patches is 0 (BEiT's)


def masked_count(ratio: float, num_patches: int) -> int:
  """round(ratio * L), halves rounded up, as both mask generators compute it."""
  return int(math.floor(ratio * num_patches + 0.5))

# Splits carved from a dataset's "train" split (sove_jax.data.sources, docs/input.md): a held-out
# "minival" of data.minival_examples examples and the rest, "train-minival".
CARVED_SPLITS = ("minival", "train-minival")
FASHION_MNIST_TRAIN_CLASSES = (6000,) * 10  # examples per class of Fashion-MNIST's train split


def validate_minival(examples: int, *, split_size: int, class_counts=None, where: str):
  """Whether `examples` minival examples can be carved from a train split of `split_size`
  (class-balanced when `class_counts`, the examples of each class, is given)."""
  _require(examples < split_size,
           f"data.minival_examples={examples} must be fewer than the {split_size} examples of "
           f"{where}, so that train-minival keeps some.")
  if class_counts is not None:
    k, fewest = len(class_counts), min(class_counts)
    _require(examples % k == 0,
             f"data.minival_examples={examples} must be a multiple of the {k} classes of {where}: "
             "minival takes as many examples of each class.")
    _require(examples // k < fewest,
             f"data.minival_examples={examples} takes {examples // k} examples of each class, but "
             f"a class of {where} has only {fewest}: lower it, so every class stays in training.")

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


# --- dotted fields and command-line overrides ---------------------------------------------------


def get_field(config, field: str):
  """The value of the dotted field `field` ("sove.num_anchors") of a ConfigDict.

  KeyError names the whole field when a part of it is missing.
  """
  node = config
  for part in field.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      raise KeyError(f"config has no field {field!r}") from None
  return node


def flat_fields(config, prefix: str = "") -> dict:
  """{dotted field: value} of every leaf of a ConfigDict, lists and tuples both as tuples (JSON
  stores tuples as lists, so a stored config compares alike)."""
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(flat_fields(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = _as_tuples(value)
  return out


def _as_tuples(value):
  return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def set_field(config, field: str, value, *, create: bool = False, check_type: bool = True):
  """Sets the dotted field `field` of a ConfigDict to `value`.

  `create`: missing sections and fields are made (a config restored from an older run);
  otherwise a missing one raises KeyError naming the field. `check_type=False` accepts a value of
  another type than the field's (ConfigDict refuses that by default).
  """
  *sections, name = field.split(".")
  node = config
  for section in sections:
    if section not in node:
      if not create:
        raise KeyError(f"config has no field {field!r}")
      import ml_collections
      node[section] = ml_collections.ConfigDict()
    node = node[section]
  if name not in node and not create:
    raise KeyError(f"config has no field {field!r}")
  if check_type:
    node[name] = value
  else:
    with node.ignore_type():
      node[name] = value


def _literal(value) -> str:
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(_literal(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return repr(value)   # bool True/False, int, float (shortest round trip), str quoted


def override(field: str, value) -> str:
  """`--config.FIELD=VALUE`, the command-line override that sets `field` to `value`.

  VALUE is what ml_collections' config flags parse back to `value`: a string as it is, any
  other value as a Python literal (True/False, 0.002, (0.3,1.0), ('embed','fsdp')), which its
  boolean, number and tuple parsers all read (booleans: absl also reads true/false).
  """
  text = value if isinstance(value, str) else _literal(value)
  return f"--config.{field}={text}"


def parse_override(text: str) -> tuple[str, str]:
  """(field, value text) of `--config.FIELD=VALUE` (the leading `--` optional); ValueError
  for any other text."""
  body = text[2:] if text.startswith("--") else text
  field, sep, value = body.partition("=")
  parts = field.split(".")
  if (not sep or parts[0] != "config" or len(parts) < 2
      or not all(p.isidentifier() for p in parts[1:])):
    raise ValueError(f"{text!r} is not of the form --config.FIELD=VALUE")
  return ".".join(parts[1:]), value


def apply_overrides(config, overrides):
  """`config` with the `--config.FIELD=VALUE` strings applied by ml_collections' own parser,
  exactly as `python -m sove_jax.main --config=... OVERRIDES` would (a new ConfigDict)."""
  from absl import flags
  from ml_collections import config_flags
  import ml_collections
  argv = ["overrides", *overrides]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_dict("config", ml_collections.ConfigDict(config.to_dict()),
                                           flag_values=values, sys_argv=argv)
  values(argv)
  return holder.value


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


def validate_data(d, *, patch_size: int, global_batch_size: int, process_count: int = 1,
                  token_stride: int = 0):
  """The `data` block's checks (also run by the input pipeline alone); touches no files.

  `token_stride`: input pixels per final token of the backbone (`models.network.token_stride`;
  0: `patch_size`, the ViT's). The masks are drawn at the global crop's final token grid.
  """
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
  translate = d.get("translate", 0)
  _require(translate >= 0 and translate < d.global_size,
           f"data.translate={translate} must be >= 0 and smaller than data.global_size="
           f"{d.global_size} (it shifts each view by up to that many pixels).")
  _require(not translate or d.augment == "host",
           f"data.translate={translate} needs data.augment='host': the views made in the step "
           "(augment='device') have no translation.")
  b = global_batch_size
  _require(b > 0 and process_count > 0 and b % process_count == 0,
           f"batch_size={b} must be a positive multiple of the {process_count} processes.")
  _require(d.num_local >= 0, f"data.num_local={d.num_local} must be >= 0.")
  for field in ("global_size", "local_size", "eval_crop"):
    size = d[field]
    _require(size > 0 and size % patch_size == 0,
             f"data.{field}={size} must be a positive multiple of model.patch_size={patch_size}.")
  stride = token_stride or patch_size
  _require(d.global_size % stride == 0,
           f"data.global_size={d.global_size} must be a multiple of {stride} px, the Swin's input "
           f"pixels per final token (model.patch_size * 2 ** (stages - 1)), so that its final "
           "grid, where the masks are drawn, is whole.")
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
  _probability(d.mask_prob, "mask_prob")
  _require(isinstance(d.mask_start_epoch, int) and d.mask_start_epoch >= 0,
           f"data.mask_start_epoch={d.mask_start_epoch!r} must be a whole number of epochs >= 0.")
  side = d.global_size // stride
  num_patches = side * side
  _require(0 <= d.mask_min_patches <= num_patches,
           f"data.mask_min_patches={d.mask_min_patches} must be in [0, {num_patches}] "
           f"({side}x{side} mask cells; 0 = the mask type's own minimum).")
  if d.mask_type == "block_exact":
    smallest = d.mask_min_patches or EXACT_MIN_PATCHES
    fewest = masked_count(low, num_patches)
    _require(not 0 < fewest < smallest,
             f"Exact block masks need >= {smallest} patches (data.mask_min_patches) but ratio "
             f"{low:.3g} of {num_patches} patches masks only {fewest}.")
  _require(d.shuffle_buffer >= 1 and d.prefetch >= 0 and d.threads >= 0,
           "data.shuffle_buffer must be >= 1, data.prefetch and data.threads >= 0.")
  _require(d.minival_examples >= 1 and d.minival_seed >= 0,
           f"data.minival_examples={d.minival_examples} must be >= 1 and "
           f"data.minival_seed={d.minival_seed} >= 0.")
  if d.source == "fashion_mnist" and not d.data_dir:  # the packaged dataset: sizes known here
    validate_minival(d.minival_examples, split_size=sum(FASHION_MNIST_TRAIN_CLASSES),
                     class_counts=FASHION_MNIST_TRAIN_CLASSES, where="Fashion-MNIST's train split")


def _validate_swin(m, network):
  """The Swin backbone's own checks: its stages, window and the options it does not have."""
  try:
    network.swin_size(m)
  except ValueError as e:
    raise ConfigError(f"{e}.") from None
  _require(m.window_size >= 1, f"model.window_size={m.window_size} must be >= 1.")
  _require(m.patch_size >= 1, f"model.patch_size={m.patch_size} must be >= 1.")
  _require(m.attention == "xla",
           f"model.attention={m.attention!r} is a ViT option: the Swin's window attention runs "
           "in XLA (set model.attention='xla').")
  _require(not m.scan_layers,
           "model.scan_layers=True is a ViT option: the Swin's stages differ in shape and "
           "cannot be scanned (set model.scan_layers=False).")


def validate(config, *, num_devices: int, process_count: int = 1):
  """Raises ConfigError on the first problem found."""
  # The model's own choices and size rules, read where they are defined (no TensorFlow); only
  # this whole-run check imports the models, not the input pipeline's checks above.
  from sove_jax.models import network, swin as swin_lib, vit
  m, o = config.model, config.optim
  _one_of(config.method, network.METHODS, "method")
  _one_of(m.arch, network.ARCHS, "model.arch")
  swin = m.arch == "swin"
  if swin:
    _require(m.variant in swin_lib.SWIN_VARIANTS,
             f"model.variant={m.variant!r} is not a Swin size (model.arch='swin'): choose one of "
             f"{', '.join(map(repr, swin_lib.SWIN_VARIANTS))}.")
  else:
    _one_of(m.variant, tuple(vit.VARIANTS), "model.variant")
  _one_of(m.dtype, DTYPES, "model.dtype")
  _one_of(m.global_pool, network.GLOBAL_POOLS, "model.global_pool")
  _one_of(o.clip_mode, ("per_tensor", "global"), "optim.clip_mode")
  _one_of(m.attention, ATTENTIONS, "model.attention")
  _one_of(m.pos_interpolation, vit.POS_INTERPOLATIONS, "model.pos_interpolation")

  _require(m.patch_size > 0, f"model.patch_size={m.patch_size} must be > 0.")
  validate_run_control(config)
  b = config.batch_size
  _require(b > 0 and b % num_devices == 0,
           f"batch_size={b} must be a positive multiple of the {num_devices} devices.")
  for field in ("width", "depth", "num_heads"):
    _require(m[field] >= 0, f"model.{field}={m[field]} must be >= 0 (0: model.variant's).")
  if swin:
    _validate_swin(m, network)
  validate_data(config.data, patch_size=m.patch_size, global_batch_size=b,
                process_count=process_count, token_stride=network.token_stride(m))
  width, _, heads = network.swin_size(m) if swin else network.vit_size(m)
  heads = heads[0] if swin else heads
  if not swin:
    w, depth, nh = network.vit_size(m)
    _require(min(w, depth, nh) > 0,
             f"The ViT needs width, depth and heads > 0, got {w}, {depth}, {nh} "
             f"(model.variant={m.variant!r}, model.width={m.width}, model.depth={m.depth}, "
             f"model.num_heads={m.num_heads}).")
  _require(width % heads == 0,
           f"The {'Swin' if swin else 'ViT'} width {width} must be divisible by its {heads} heads "
           f"(model.variant={m.variant!r}, model.width={m.width}, "
           f"model.num_heads={m.num_heads}).")
  _require(config.num_epochs > 0 or config.total_steps > 0,
           "Set num_epochs > 0 or total_steps > 0: the run has no length.")
  if config.method == "sove":
    validate_sove(config.sove, global_batch_size=b, num_devices=num_devices)
  else:
    validate_baseline(config.baseline, method=config.method)
  _require(o.base_lr > 0, f"optim.base_lr={o.base_lr} must be > 0.")
  _require(o.clip >= 0, f"optim.clip={o.clip} must be >= 0 (0 turns clipping off).")
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


def _loss_weights(block, name: str, *, needs_class: bool = False):
  """Both weights >= 0 and at least one loss left (the [CLS] loss, where it is the only one)."""
  for field in ("class_weight", "patch_weight"):
    _require(block[field] >= 0, f"{name}.{field}={block[field]} must be >= 0 (0 drops that loss).")
  if needs_class:
    _require(block.class_weight > 0,
             f"{name}.class_weight={block.class_weight} must be > 0: DINO has only the [CLS] loss.")
  _require(block.class_weight > 0 or block.patch_weight > 0,
           f"{name}.class_weight and {name}.patch_weight are both 0: no loss is left to train.")


def validate_sove(sove_config, *, global_batch_size: int, num_devices: int):
  """The `sove` block's checks (config.method "sove")."""
  s, b = sove_config, global_batch_size
  _one_of(s.labels, ("soft", "onehot"), "sove.labels")
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
  _loss_weights(s, "sove")
  koleo = s.get("koleo_weight", 0.0)
  _require(koleo >= 0, f"sove.koleo_weight={koleo} must be >= 0 (0 turns KoLeo off).")
  _require(koleo == 0 or b >= 2, f"sove.koleo_weight={koleo} needs batch_size >= 2: each "
           f"embedding's nearest neighbor is another image's (batch_size={b}).")


def validate_baseline(baseline_config, *, method: str):
  """The `baseline` block's checks (config.method "dino" or "ibot")."""
  bl = baseline_config
  _require(isinstance(bl.num_prototypes, int) and bl.num_prototypes >= 2,
           f"baseline.num_prototypes={bl.num_prototypes!r} must be an integer >= 2.")
  for field in ("student_temp", "teacher_temp", "teacher_temp_warmup", "teacher_patch_temp",
                "teacher_patch_temp_warmup"):
    _require(bl[field] > 0, f"baseline.{field}={bl[field]} must be > 0.")
  _require(bl.teacher_temp_warmup_epochs >= 0,
           f"baseline.teacher_temp_warmup_epochs={bl.teacher_temp_warmup_epochs} must be >= 0.")
  _require(0.0 <= bl.center_momentum < 1.0,
           f"baseline.center_momentum={bl.center_momentum} must be in [0, 1) (1 would never "
           "move the centers).")
  _require(bl.freeze_last_layer_epochs >= 0,
           f"baseline.freeze_last_layer_epochs={bl.freeze_last_layer_epochs} must be >= 0.")
  _loss_weights(bl, "baseline", needs_class=method == "dino")


# --- run control ---------------------------------------------------------------------------------

def validate_run_control(config):
  """Length, cadences, checkpoints and the k-NN monitor: values that would silently do
  something else are refused."""
  _require(config.total_steps > 0 or config.total_steps == -1,
           f"total_steps={config.total_steps} must be > 0, or -1 to train for num_epochs.")
  _require(config.log_every >= 1, f"log_every={config.log_every} must be >= 1 (steps between "
           "metric lines).")
  _require(config.checkpoint_every >= 0, f"checkpoint_every={config.checkpoint_every} must be "
           ">= 0 (0: only at the end and on preemption).")
  _require(config.keep_checkpoints >= 1, f"keep_checkpoints={config.keep_checkpoints} must be "
           ">= 1: with 0 every checkpoint, the final one included, would be deleted.")
  _require(config.keep_period >= 0, f"keep_period={config.keep_period} must be >= 0 (0: keep "
           "only the last keep_checkpoints).")
  _require(config.keep_period == 0 or config.checkpoint_every == 0
           or config.keep_period % config.checkpoint_every == 0,
           f"keep_period={config.keep_period} must be a multiple of checkpoint_every="
           f"{config.checkpoint_every}, or no checkpoint would ever be kept for good.")
  _require(config.prefetch_to_device >= 0, f"prefetch_to_device={config.prefetch_to_device} "
           "must be >= 0 (0: batches are put on the devices between steps).")
  h = config.hosts
  for field in ("stall_timeout_s", "slow_timeout_s", "answer_s", "heartbeat_timeout_s",
                "shutdown_timeout_s"):
    _require(h[field] > 0, f"hosts.{field}={h[field]} must be > 0 seconds.")
  # JAX's agents send a heartbeat every half of its timeout, so a silent process can be declared
  # dead half a timeout after it stopped: the watchdog (stall, then the roll call) must be done
  # by then.
  _require(h.stall_timeout_s + h.answer_s + 10 <= h.heartbeat_timeout_s / 2,
           f"hosts.heartbeat_timeout_s={h.heartbeat_timeout_s} must be at least twice "
           f"hosts.stall_timeout_s + hosts.answer_s + 10 s (= {h.stall_timeout_s + h.answer_s + 10}"
           " s), so that the watchdog names a lost process before JAX's heartbeat ends every "
           "process without naming it.")
  _require(config.knn_every >= 0, f"knn_every={config.knn_every} must be >= 0 (0: never).")
  ks = tuple(config.knn_k)
  _require(len(ks) > 0 and all(int(k) == k and k >= 1 for k in ks),
           f"knn_k={ks} must be neighbor counts >= 1.")
  memory = config.knn_train_examples
  _require(not (config.knn_every > 0 and 0 <= memory < max(ks)),
           f"knn_k={ks} asks for {max(ks)} neighbors but the k-NN monitor's memory holds "
           f"knn_train_examples={memory}: lower knn_k or raise knn_train_examples.")


def validate_schedule(config, *, steps_per_epoch: int, total_steps: int):
  """Schedules that do not fit in the run (known once the data gives the epoch's length)."""
  warmup = round(config.optim.warmup_epochs * steps_per_epoch)
  _require(warmup < total_steps,
           f"optim.warmup_epochs={config.optim.warmup_epochs} is {warmup} steps, not shorter "
           f"than the run's {total_steps}: the learning rate would never decay; shorten the "
           "warm-up or lengthen the run.")
  temp_warmup = round(config.sove.teacher_temp_warmup_epochs * steps_per_epoch)
  _require(temp_warmup <= total_steps,
           f"sove.teacher_temp_warmup_epochs={config.sove.teacher_temp_warmup_epochs} is "
           f"{temp_warmup} steps, longer than the run's {total_steps}: the teacher temperature "
           "would never reach sove.teacher_temp.")
