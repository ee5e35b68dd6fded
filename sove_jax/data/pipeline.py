"""Train and evaluation input: tf.data pipelines on each host, host batches -> global jax.Arrays.

Training stream (docs/method.md §9, docs/input.md; the epoch loop and state are
`stream.TrainStream`'s). Each epoch has a fixed order per process, derived from (seed, epoch):
sources read by index get a global permutation of which process p takes every P-th entry
(disjoint, N // P each; TFDS ArrayRecord computes it per position, sove_jax/data/indexed.py); a
TFDS TFRecord stream gives each process a contiguous 1/P of the split, shuffles its files and a
buffer of records. Every random draw of an example or batch is a stateless function of (seed,
process, epoch, position in the epoch), so the stream depends on nothing else, and the iterator
state is just (epoch, position): a restored run rebuilds the epoch from `position` (a stream
skips that many records, reading them) instead of replaying batches. A checkpoint holds every
process's state (`merge_states`); sources read by index restore it on another number of
processes too (sove_jax/data/order.py).

Per host, data.augment = "host": read -> decode -> crop + flip (per example when images differ
in size; per batch from memory) -> batch (drop_remainder) -> color/gray/blur/solarize +
normalize (per batch) -> masks -> prefetch.
data.augment = "device" (the views are cut and the masks drawn inside the jitted step,
sove_jax/views.py and sove_jax/masks.py): read -> decode, downscaled in the DCT domain when the
image is 2x or more the canvas -> fit (finish the downscale; the fitted size recorded) -> batch,
each image padded into its uint8 canvas slot -> prefetch. An in-memory source lives whole on
the device (`device_resident`): its pipeline reads indices and labels, nothing else.
An example that fails to decode is dropped; the gap it leaves in the positions is how it is
counted and named in the log. A process whose whole epoch gives no batch raises `InputFailed`.
"""
from __future__ import annotations

import logging

import jax
import numpy as np
import tensorflow as tf

from sove_jax import configuration
from sove_jax.data import augment, indexed, masking, sources, stream
from sove_jax.data.order import host_order, merge_states  # noqa: F401  (the trainer's API)
from sove_jax.data.stream import InputFailed, epoch_shape, processes  # noqa: F401  (as above)

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
STAGES = ("read", "decode", "fit", "crop", "color", "mask")  # a pipeline can be cut after any
_CROP, _COLOR, _MASK = 1, 2, 3    # which stage a random draw belongs to...
_GLOBAL, _LOCAL, _FLIP, _SHIFT = 1, 2, 3, 4    # ...and which views or what within it


# --- device mode: decode and fit into a canvas ---------------------------------------------------

JPEG_RATIOS = (1, 2, 4, 8)  # tf.io.decode_jpeg's `ratio` (a static attribute: one branch each)


def fit_plan(height, width, canvas: int):
  """How an image of height x width goes into a canvas x canvas square: (ratio, height, width).

  The fitted size is the image's own if it fits, else the image downscaled, aspect kept, until
  its longer side is `canvas` (sides rounded, >= 1). `ratio` is 1 for an image that fits, else
  the largest JPEG DCT-domain downscale (1, 2, 4 or 8; libjpeg decodes ceil(side / ratio)
  pixels) that still yields at least the fitted size on both sides: the decoder does the bulk
  of a large image's downscaling at a fraction of the cost of decoding it whole, and a resize
  finishes it (by less than 2x).
  """
  height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
  longest = tf.maximum(height, width)

  def fitted(side):
    return tf.where(longest <= canvas, side,
                    tf.maximum(1, (side * canvas + longest // 2) // longest))
  fit_height, fit_width = fitted(height), fitted(width)
  ratio = tf.constant(1, tf.int32)
  for r in JPEG_RATIOS[1:]:  # ascending: the last that fits is the largest
    fits = ((height + r - 1) // r >= fit_height) & ((width + r - 1) // r >= fit_width)
    ratio = tf.where(fits & (longest > canvas), r, ratio)
  return ratio, fit_height, fit_width


def decode_for_canvas(example, canvas: int):
  """Encoded bytes -> "image" uint8 [h, w, 3], a JPEG decoded at `fit_plan`'s DCT ratio, and
  "size" int32 [2], the size it will have on the canvas."""
  example = dict(example)
  data = example.pop("bytes")

  def jpeg():
    shape = tf.io.extract_jpeg_shape(data)  # the header only
    ratio, height, width = fit_plan(shape[0], shape[1], canvas)
    branches = [lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r) for r in JPEG_RATIOS]
    index = tf.reduce_sum(tf.cast(ratio > tf.constant(JPEG_RATIOS[:-1]), tf.int32))
    return tf.switch_case(index, branches), tf.stack([height, width])

  def other():  # PNG, GIF, BMP: decoded whole
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    _, height, width = fit_plan(tf.shape(image)[0], tf.shape(image)[1], canvas)
    return image, tf.stack([height, width])
  image, size = tf.cond(tf.io.is_jpeg(data), jpeg, other)
  image.set_shape([None, None, 3])
  return {**example, "image": image, "size": size}


def fit_to_canvas(example, canvas: int):
  """"image" -> "canvas" uint8 [h, w, 3] with (h, w) = "size" <= canvas: resized where it is
  not that size already. Batching (`_batch`) pads it with zeros at the bottom and right to
  canvas x canvas, the views never read them (their boxes lie within "size"); padding there
  writes each image into the batch once instead of copying a padded image (0.15 ms an image).

  The resize only ever shrinks, by less than 2x after the decoder's DCT downscale, and uses
  area averaging (each output pixel the mean of the input it covers, an antialiasing box
  filter): about a third of the CPU of an antialiased bilinear resize, within one gray level of
  it on photographs, and the costliest host step for the images larger than the canvas.
  """
  example = dict(example)
  image, size = example.pop("image"), example["size"]

  def resize():
    x = tf.image.resize(image, size, method="area")  # means of uint8: within [0, 255]
    return tf.cast(tf.round(x), tf.uint8)
  image = tf.cond(tf.reduce_all(tf.shape(image)[:2] == size), lambda: image, resize)
  return {**example, "canvas": image}


def _batch(ds, batch_size: int, canvas: int):
  """Whole batches; a "canvas" image is padded into its canvas x canvas slot as it is copied."""
  if "canvas" not in ds.element_spec:
    return ds.batch(batch_size, drop_remainder=True)
  shapes = {k: ([canvas, canvas, 3] if k == "canvas" else spec.shape)
            for k, spec in ds.element_spec.items()}
  return ds.padded_batch(batch_size, padded_shapes=shapes, drop_remainder=True)


# --- training -------------------------------------------------------------------------------------

class TrainInput(stream.TrainStream):
  """Iterator over host-local training batches (numpy), resumable from `get_state()`.

  Each batch: "label" int32 [b]; b = global batch / P. And by data.augment:
    "host":   "global" float32 [b, 2, G, G, 3], "local" float32 [b, N, S, S, 3] (absent when
              N = 0), the views; "mask" bool [b, 2, (G/t)^2] (True = masked), t = `token_stride`,
              the backbone's input pixels per final token (default `patch_size`, the ViT's; a
              Swin's is its patch doubled per merging): masks are drawn at that token grid;
    "device": "canvas" uint8 [b, C, C, 3] with "size" int32 [b, 2], each image at the top left
              of its canvas (C = data.canvas_size); from an in-memory source, "index" int32 [b]
              into its images, which live on the device (`resident`, `device_resident`). The
              step draws the masks (sove_jax/masks.py).
  """

  def __init__(self, source, data_config, *, patch_size: int, global_batch_size: int, seed: int,
               process_index: int, process_count: int, token_stride: int = 0):
    d = data_config
    self.device = d.augment == "device"
    self.resident = self.device and isinstance(source, sources.ArraySource)
    super().__init__(source, d, global_batch_size=global_batch_size, seed=seed,
                     process_index=process_index, process_count=process_count,
                     images=not self.resident)
    self.grid = d.global_size // (token_stride or patch_size)
    self._stages = self._stage_fns()

  # Stages: functions of one element (example or batch), traced once and reused by every epoch --

  def _key(self, epoch, position, stage: int):
    """Stateless seed of one example or batch: (seed, process) + epoch, position, stage."""
    base = tf.constant([self.seed, self.process_index], tf.int64)
    return augment.fold(augment.fold(augment.fold(base, epoch), position), stage)

  def _boxes(self, key, shape, height, width):
    """Crop boxes, flips and shifts (None when off) of the global and the local views."""
    d = self.config

    def draw(views, n, scale):
      key_views = augment.fold(key, views)
      boxes = augment.draw_crop_boxes(key_views, shape + [n], height, width, tuple(scale),
                                      tuple(d.aspect_ratio))
      flips = tf.random.stateless_uniform(shape + [n], augment.fold(key_views, _FLIP)) < 0.5
      shifts = None
      if d.get("translate", 0):
        shifts = tf.random.stateless_uniform(shape + [n, 2], augment.fold(key_views, _SHIFT),
                                             -d.translate, d.translate + 1, dtype=tf.int32)
      return boxes, (flips if d.flip else None), shifts
    return draw(_GLOBAL, 2, d.global_scale), draw(_LOCAL, d.num_local, d.local_scale)

  @staticmethod
  def _shifted(views, shifts):
    return views if shifts is None else augment.translate(views, shifts)

  def _read_arrays(self, batch):
    batch = dict(batch)  # traced functions may not change their arguments
    index = batch.pop("index")
    return {**batch, "image": tf.gather(self.tables["image"], index),
            "label": tf.gather(self.tables["label"], index)}

  def _read_indices(self, batch):
    """Device mode, in-memory source: the step gathers the images by index on the device."""
    batch = dict(batch)  # traced functions may not change their arguments
    index = batch["index"]
    return {**batch, "index": tf.cast(index, tf.int32),
            "label": tf.gather(self.tables["label"], index)}

  def _crop_batch(self, batch):
    """Crops of a batch of same-size images in memory (gray stays 1 channel until normalized)."""
    batch = dict(batch)  # traced functions may not change their arguments
    d = self.config
    image = batch.pop("image")
    g, l = self._boxes(self._key(batch["epoch"][0], batch["position"][0], _CROP), [self.batch_size],
                       image.shape[1], image.shape[2])
    batch["global"] = self._shifted(augment.resized_crops(image, g[0], d.global_size, flip=g[1]),
                                    g[2])
    if d.num_local:
      batch["local"] = self._shifted(augment.resized_crops(image, l[0], d.local_size, flip=l[1]),
                                     l[2])
    return batch

  def _crop_example(self, example):
    """Crops for one decoded image of any size."""
    example = dict(example)  # traced functions may not change their arguments
    d = self.config
    image = example.pop("image")
    g, l = self._boxes(self._key(example["epoch"], example["position"], _CROP), [],
                       tf.shape(image)[0], tf.shape(image)[1])

    def views(boxes, flips, shifts, size):
      flips = [None] * boxes.shape[0] if flips is None else tf.unstack(flips)
      return self._shifted(tf.stack([augment.resized_crop(image, box, size, flip)
                                     for box, flip in zip(tf.unstack(boxes), flips)]), shifts)
    example["global"] = views(*g, d.global_size)
    if d.num_local:
      example["local"] = views(*l, d.local_size)
    return example

  def _color(self, batch):
    batch = dict(batch)  # traced functions may not change their arguments
    d = self.config
    key = self._key(batch["epoch"][0], batch["position"][0], _COLOR)
    common = dict(jitter_prob=d.color_jitter_prob, jitter=tuple(d.color_jitter),
                  gray_prob=d.grayscale_prob, blur_sigma=tuple(d.blur_sigma))

    def finish(x):  # gray views (1 channel) become 3 channels here
      x = tf.tile(x, [1, 1, 1, 1, 3]) if x.shape[-1] == 1 else x
      return augment.normalize(x, d.mean, d.std)

    g = augment.photometric(batch["global"], augment.fold(key, _GLOBAL), **common,
                            blur_prob=tuple(d.blur_prob[:2]),
                            solarize_prob=tuple(d.solarize_prob[:2]))
    batch["global"] = finish(g)
    if d.num_local:
      l = augment.photometric(batch["local"], augment.fold(key, _LOCAL), **common,
                              blur_prob=(d.blur_prob[2],) * d.num_local,
                              solarize_prob=(d.solarize_prob[2],) * d.num_local)
      batch["local"] = finish(l)
    return batch

  def _masks(self, batch):
    d, b, grid = self.config, self.batch_size, self.grid
    key = self._key(batch["epoch"][0], batch["position"][0], _MASK)
    mask = masking.masks(key, 2 * b, (grid, grid), d.mask_type, d.mask_ratio, d.mask_ratio_var,
                         d.mask_min_patches, prob=d.mask_prob, start_epoch=d.mask_start_epoch,
                         epoch=batch["epoch"][0])
    return {**batch, "mask": tf.reshape(mask, [b, 2, grid * grid])}

  def _stage_fns(self) -> list[tuple[str, object, bool]]:
    """(name, function, per example?) in pipeline order, for this kind of source."""
    src, canvas = self.source, self.config.canvas_size
    if isinstance(src, sources.ArraySource):
      fns = ([("read", self._read_indices, False)] if self.device else
             [("read", self._read_arrays, False), ("crop", self._crop_batch, False)])
    else:
      read = self.read_encoded if self.tables else (lambda e: e)  # a stream has the bytes
      fns = [("read", read, True)]
      if self.device:
        fns += [("decode", lambda e: decode_for_canvas(e, canvas), True),
                ("fit", lambda e: fit_to_canvas(e, canvas), True)]
      else:
        fns += [("decode", stream.decode, True), ("crop", self._crop_example, True)]
    if not self.device:
      fns += [("color", self._color, False), ("mask", self._masks, False)]
    return [(name, tf.function(fn, autograph=False), per_example) for name, fn, per_example in fns]

  def stages(self) -> list[str]:
    """The stage names of this source's pipeline, in order (arrays in memory need no decode)."""
    return [name for name, _, _ in self._stages]

  def dataset(self, epoch: int = 0, position: int = 0,
              stop_after: str | None = None) -> tf.data.Dataset:
    """This process's batches of `epoch` from `position` on; `stop_after` cuts after a stage.

    Elements keep "epoch" and "position" (int64, per example) so consumers can count and resume.
    """
    if stop_after is not None and stop_after not in self.stages():
      raise ValueError(f"stop_after must be one of {self.stages()}, not {stop_after!r}")
    d, b, src = self.config, self.batch_size, self.source
    ds, head = self.records(epoch, position)
    batched = isinstance(src, sources.ArraySource)  # in memory: read and cropped per batch
    if batched:
      ds, fns = stream.ordered_map(ds, head).batch(b, drop_remainder=True), []
    else:  # the read and decode share the head's map (each map costs ~0.03 ms an example)
      fns = [head]
    for name, fn, per_example in self._stages:
      if per_example == batched:  # the first per-batch stage: finish the per-example run, batch
        ds = _batch(stream.ordered_map(ds, *fns) if fns else ds, b, d.canvas_size)
        fns, batched = [], True
      fns.append(fn)
      if name == "decode":  # drops examples that fail to read or decode, and only those
        ds, fns = stream.ordered_map(ds, *fns).ignore_errors(log_warning=False), []
      if name == stop_after:
        break
    if fns:
      ds = stream.ordered_map(ds, *fns)
    if not batched and stop_after in (None, self.stages()[-1]):  # per example to the end
      ds = _batch(ds, b, d.canvas_size)
    return ds.prefetch(d.prefetch).with_options(stream.options(d.threads))


def train_input(data_config, *, patch_size: int, global_batch_size: int, seed: int,
                process_index: int | None = None, process_count: int | None = None,
                token_stride: int = 0) -> TrainInput:
  """The training stream of this process, from the `data` config block; host-drawn masks at the
  global crop's grid of `token_stride` px tokens (default `patch_size`; see `TrainInput`)."""
  process_index, process_count = processes(process_index, process_count)
  configuration.validate_data(data_config, patch_size=patch_size,
                              global_batch_size=global_batch_size, process_count=process_count,
                              token_stride=token_stride)
  source = sources.open_source(data_config, data_config.train_split)
  return TrainInput(source, data_config, patch_size=patch_size, global_batch_size=global_batch_size,
                    seed=seed, process_index=process_index, process_count=process_count,
                    token_stride=token_stride)


# --- evaluation -----------------------------------------------------------------------------------

class EvalInput:
  """Re-iterable evaluation batches: "image" float32 [b, C, C, 3], "label" int32 [b], "valid" [b].

  Each pass yields every example of the split (or of its first `max_examples`) exactly once over
  all processes, in split order; every process yields the same number of batches, the last ones
  padded with valid=False (label -1, image zeros).
  """

  def __init__(self, source, data_config, *, global_batch_size: int, process_index: int,
               process_count: int, max_examples: int = -1):
    self.source, self.config = source, data_config
    self.process_index, self.process_count = process_index, process_count
    self.batch_size = global_batch_size // process_count
    n = len(source)
    self.num_examples = n if max_examples < 0 else min(max_examples, n)
    self._max_examples = max_examples if 0 <= max_examples < n else -1
    self._tables = stream.tables(source)
    per_process = -(-self.num_examples // process_count)
    self.num_batches = -(-per_process // self.batch_size)
    self.num_skipped = 0  # examples of the last pass that did not decode (this process)
    self._dataset = None  # built once, iterated afresh by every pass
    self._gates = [indexed.Gate()] if isinstance(source, indexed.ArrayRecordSource) else []

  def _indices(self) -> np.ndarray:
    return np.array_split(np.arange(self.num_examples), self.process_count)[self.process_index]

  def dataset(self) -> tf.data.Dataset:
    d, b, src = self.config, self.batch_size, self.source
    total = self.num_batches * b
    normalize = lambda x: augment.normalize(x, d.mean, d.std)
    if isinstance(src, sources.ArraySource):
      index = np.full(total, -1, np.int64)
      mine = self._indices()
      index[: len(mine)] = mine
      tables = self._tables
      C = src.images.shape[-1]

      def prepare(idx):
        valid = idx >= 0
        safe = tf.maximum(idx, 0)
        image = augment.eval_view(tf.gather(tables["image"], safe), d.eval_resize, d.eval_crop)
        if C == 1:
          image = tf.tile(image, [1, 1, 1, 3])
        image = tf.where(valid[:, None, None, None], normalize(image), 0.0)
        return {"image": image, "label": tf.where(valid, tf.gather(tables["label"], safe), -1),
                "valid": valid}
      ds = stream.ordered_map(tf.data.Dataset.from_tensor_slices(index).batch(b), prepare)
    else:
      if isinstance(src, sources.TfdsSource):
        ds = src.host_records(self.process_index, self.process_count, drop_remainder=False,
                              max_examples=self._max_examples)
        ds = stream.ordered_map(ds, lambda image, label: {"bytes": image, "label": label})
      elif isinstance(src, indexed.ArrayRecordSource):  # one read per batch of indices
        gate = self._gates[0]
        ds = stream.ordered_map(
            tf.data.Dataset.from_tensor_slices(self._indices()).batch(b),
            lambda i: dict(zip(("bytes", "label"), src.read(i, gate)))).unbatch()
      else:
        tables = self._tables
        ds = stream.ordered_map(tf.data.Dataset.from_tensor_slices(self._indices()),
                                lambda i: {"bytes": tf.io.read_file(tf.gather(tables["path"], i)),
                                           "label": tf.gather(tables["label"], i)})

      def prepare(example):
        image = augment.eval_view(stream.decode(example)["image"], d.eval_resize, d.eval_crop)
        return {"image": normalize(image), "label": example["label"], "valid": tf.constant(True)}
      ds = stream.ordered_map(ds, prepare).ignore_errors(log_warning=True)
      pad = {"image": tf.zeros([d.eval_crop, d.eval_crop, 3]), "label": tf.constant(-1, tf.int32),
             "valid": tf.constant(False)}
      ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat()).take(total).batch(b)
    return ds.prefetch(d.prefetch).with_options(stream.options(d.threads))

  def __iter__(self):
    if self._dataset is None:
      self._dataset = self.dataset()
    valid = 0
    batches = indexed.GatedIterator(self._dataset, self._gates)
    try:
      for batch in batches:
        valid += int(batch["valid"].sum())
        yield batch
    finally:
      batches.close()  # also when the consumer stops early
    if not isinstance(self.source, sources.TfdsSource):
      self.num_skipped = len(self._indices()) - valid
      if self.num_skipped:
        log.warning("Evaluation on %s skipped %d example(s) that did not decode.",
                    self.source.name, self.num_skipped)


def eval_input(data_config, *, split: str, global_batch_size: int, process_index: int | None = None,
               process_count: int | None = None, max_examples: int = -1) -> EvalInput:
  """The evaluation batches of `split` for this process, from the `data` config block."""
  process_index, process_count = processes(process_index, process_count)
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"The global batch {global_batch_size} must be a positive multiple of the "
                     f"process count {process_count}.")
  source = sources.open_source(data_config, split)
  return EvalInput(source, data_config, global_batch_size=global_batch_size,
                   process_index=process_index, process_count=process_count,
                   max_examples=max_examples)


# --- host -> device -------------------------------------------------------------------------------

def device_resident(train_input: TrainInput, sharding) -> dict:
  """What a device-mode step reads whole from device memory: {"images": uint8 [N, H, W, C]} of
  an in-memory source, placed once with `sharding`, or {} (any other input).

  Replicated (the trainer's choice), each device gathers its share of a batch by index without
  communication, and holds the whole array: N * H * W * C bytes (Fashion-MNIST: 47 MB). The
  array is no part of the train state: checkpoints do not hold it, a resumed run places it again,
  and the input state (epoch, position) says which indices come next.
  """
  if not train_input.resident:
    return {}
  images = train_input.source.images
  return {"images": jax.make_array_from_callback(images.shape, sharding,
                                                 lambda index: images[index])}


def to_global(host_batch: dict, sharding) -> dict:
  """Host-local numpy batch -> global jax.Arrays, batch axis 0 split over processes.

  `sharding`: one jax.sharding.Sharding for every entry (e.g. NamedSharding(mesh, P("data"))),
  or a dict of them by key.
  """
  pick = (lambda k: sharding[k]) if isinstance(sharding, dict) else (lambda k: sharding)
  return {k: jax.make_array_from_process_local_data(pick(k), np.asarray(v))
          for k, v in host_batch.items()}
