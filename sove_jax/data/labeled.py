"""Labeled training input for supervised fine-tuning: one random-resized crop (+ flip) per image.

Fine-tuning trains on (image, label) pairs of a train split, or of a subset of it (1% or 10% of
the labels), with the augmentation of the DeiT/BEiT recipe's geometry: RandomResizedCrop
(area in `scale`, log-uniform aspect ratio in `ratio`, bicubic, antialiased) and a horizontal
flip, then the run's mean/std normalization. The pieces are the pretraining pipeline's
(`augment.draw_crop_boxes`, `resized_crops`, `resized_crop`, and the training stream of
`stream.TrainStream`: per-epoch orders, epoch loop, state), so the geometry and the per-epoch
order are the same code; this module only asks for one view, not
two global and N local ones, and no photometric ops or masks. Evaluation uses
`pipeline.eval_input` (resize + center crop) unchanged.

Subsets are indices into the train split in the order `pipeline.eval_input` reads it. Sources
read by index (arrays, folders, TFDS ArrayRecord) are subset by index. A TFDS TFRecord split is
a stream of records, so its subset is read once into host memory (encoded, as in the files) and
then read by index like a folder; a whole TFRecord split is streamed as pretraining streams it
(files and a buffer shuffled per epoch, each process its contiguous share).

Randomness is stateless, a function of (seed, process, epoch, position), so the stream of an
epoch depends on nothing else and a run restarted at an epoch boundary (`epoch`) or from
`get_state()` sees the same batches.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from sove_jax.data import augment, indexed, sources, stream
from sove_jax.data.sources import EncodedSource  # noqa: F401  (what `subset` makes of TFDS)

_FLIP = 1  # which draw of an example's key


def _in_order(source: sources.TfdsSource) -> tf.data.Dataset:
  """The whole TFDS split as (index, encoded image, label), in the evaluation input's order."""
  return source.host_records(0, 1, drop_remainder=False).enumerate().map(
      lambda i, r: (i, r[0], r[1]))


def split_labels(source) -> np.ndarray:
  """int32 labels of every example of a source, in split order (a TFDS split is read once)."""
  if isinstance(source, indexed.ArrayRecordSource):
    return source.labels()
  if isinstance(source, sources.TfdsSource):
    labels = source.host_records(0, 1, drop_remainder=False).map(lambda image, label: label)
    return np.fromiter(labels.as_numpy_iterator(), np.int32, count=len(source))
  return np.asarray(source.labels, np.int32)


def subset(source, indices):
  """The examples `indices` (into the split, in its order) of `source`, as a source read by
  index. Indices must be distinct and in range."""
  indices = np.asarray(indices, np.int64)
  n = len(source)
  if indices.size == 0:
    raise ValueError(f"{source.name}: the label subset is empty")
  if indices.min() < 0 or indices.max() >= n:
    raise ValueError(f"{source.name}: subset indices must be in [0, {n}), got "
                     f"[{indices.min()}, {indices.max()}]")
  if len(np.unique(indices)) != len(indices):
    raise ValueError(f"{source.name}: subset indices repeat")
  name = f"{source.name} ({len(indices)} of {n})"
  if not isinstance(source, sources.TfdsSource):
    return sources.take(source, indices, name)
  member = np.zeros(n, bool)
  member[indices] = True
  table = tf.constant(member)
  kept = _in_order(source).filter(lambda i, image, label: tf.gather(table, i))
  encoded, labels = [], []
  for _, image, label in kept.as_numpy_iterator():
    encoded.append(image)
    labels.append(label)
  return EncodedSource(encoded, labels, name=name)


class LabeledTrainInput(stream.TrainStream):
  """Iterator over host-local training batches: "image" float32 [b, S, S, 3] (normalized),
  "label" int32 [b]; b = global batch / processes. Epochs follow one another; `epoch` says
  which comes next (set it to restart at an epoch boundary; or `start_epoch`), `get_state()`
  where the stream stands.
  """

  def __init__(self, source, data_config, *, size: int, scale, ratio, flip: bool,
               global_batch_size: int, seed: int, process_index: int, process_count: int,
               start_epoch: int = 0, augment=None):
    self.augment = augment  # randaugment.TrainAugment, or None
    super().__init__(source, data_config, global_batch_size=global_batch_size, seed=seed,
                     process_index=process_index, process_count=process_count,
                     hint="use a smaller --batch_size")
    self.size, self.scale, self.ratio, self.flip = int(size), tuple(scale), tuple(ratio), flip
    self.epoch = start_epoch
    self._stages = {}

  def _key(self, epoch, position):
    base = tf.constant([self.seed, self.process_index], tf.int64)
    return augment.fold(augment.fold(base, epoch), position)

  def _flips(self, key, shape):
    if not self.flip:
      return None
    return tf.random.stateless_uniform(shape, augment.fold(key, _FLIP)) < 0.5

  def _finish(self, image, key):
    """[..., S, S, C] in [0, 1] -> normalized 3-channel float32, through `augment`'s
    (randaugment.TrainAugment) ops before and after the normalization when there is one."""
    if image.shape[-1] == 1:
      image = tf.tile(image, [1] * (image.shape.rank - 1) + [3])
    if self.augment is not None:
      image = self.augment.before_normalize(image, key)
    image = augment.normalize(image, self.config.mean, self.config.std)
    return image if self.augment is None else self.augment.after_normalize(image, key)

  # Stages: functions of one element (example or batch) that carry their epoch and position,
  # traced once and reused by every epoch.

  def _array_batch(self, element):
    """Crops of a batch of same-size images in memory (one matmul pair for the batch)."""
    index = element["index"]
    images = tf.gather(self.tables["image"], index)
    key = self._key(element["epoch"][0], element["position"][0])
    boxes = augment.draw_crop_boxes(key, [self.batch_size, 1], images.shape[1], images.shape[2],
                                    self.scale, self.ratio)
    views = augment.resized_crops(images, boxes, self.size,
                                  flip=self._flips(key, [self.batch_size, 1]))
    return {"epoch": element["epoch"], "position": element["position"],
            "image": self._finish(views[:, 0], key),
            "label": tf.gather(self.tables["label"], index)}

  def _crop_example(self, element):
    """One decoded image of any size -> its crop."""
    image = stream.decode({"bytes": element["bytes"]})["image"]
    key = self._key(element["epoch"], element["position"])
    box = augment.draw_crop_boxes(key, [], tf.shape(image)[0], tf.shape(image)[1], self.scale,
                                  self.ratio)
    view = augment.resized_crop(image, box, self.size, self._flips(key, []))
    return {"epoch": element["epoch"], "position": element["position"],
            "image": self._finish(view, key), "label": element["label"]}

  def _stage(self, name):
    if name not in self._stages:
      self._stages[name] = tf.function(getattr(self, name), autograph=False)
    return self._stages[name]

  def dataset(self, epoch: int, position: int = 0) -> tf.data.Dataset:
    """This process's batches of `epoch` from `position` on."""
    b, src, d = self.batch_size, self.source, self.config
    ds, head = self.records(epoch, position)
    if self.encoded_records:  # TFDS: the records hold the encoded images
      ds = stream.ordered_map(ds, head, self._stage("_crop_example"))
    else:
      ds = stream.ordered_map(ds, head)
      if isinstance(src, sources.ArraySource):  # in memory: read and cropped per batch
        ds = stream.ordered_map(ds.batch(b, drop_remainder=True), self._stage("_array_batch"))
        return ds.prefetch(d.prefetch).with_options(stream.options(d.threads))
      ds = stream.ordered_map(ds, self._stage("read_encoded"), self._stage("_crop_example"))
    ds = ds.ignore_errors(log_warning=False).batch(b, drop_remainder=True)
    return ds.prefetch(d.prefetch).with_options(stream.options(d.threads))


def labeled_train_input(data_config, *, split: str, indices=None, size: int, scale, ratio,
                        flip: bool, global_batch_size: int, seed: int, start_epoch: int = 0,
                        process_index: int | None = None, process_count: int | None = None,
                        augment=None) -> LabeledTrainInput:
  """The fine-tuning stream of `split` (or of its examples `indices`) for this process;
  `augment` (randaugment.TrainAugment) adds RandAugment and random erasing to the crops."""
  process_index, process_count = stream.processes(process_index, process_count)
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"The global batch {global_batch_size} must be a positive multiple of the "
                     f"process count {process_count}.")
  source = sources.open_source(data_config, split)
  if indices is not None:
    source = subset(source, indices)
  return LabeledTrainInput(source, data_config, size=size, scale=scale, ratio=ratio, flip=flip,
                           global_batch_size=global_batch_size, seed=seed,
                           process_index=process_index, process_count=process_count,
                           start_epoch=start_epoch, augment=augment)
