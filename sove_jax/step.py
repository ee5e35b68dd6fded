"""The pure train step: views -> networks -> objective -> gradients -> update -> EMA -> memory.

`make_train_step` returns `step(state, batch) -> (state, metrics)`, a pure function of arrays;
all randomness comes from the state's key. With data.augment = "device" the batch holds uint8
images and the step cuts the views and draws the masks first (`device_views`). The trainer jits
it over the mesh with the state donated. A non-finite loss leaves the state as it was (and says
so in the metrics), so the host can stop the run without a poisoned state ever reaching a
checkpoint.

`config.method` picks the objective when the step is built; the rest is shared. SOVE
(docs/method.md): the paper's eq. 2 ([CLS]) and eq. 4 (patches) against judges drawn from the
banks, which the teacher's embeddings then refill. DINO and iBOT (`sove_jax.prototypes`): the
cross-entropy over learned prototypes against the teacher's centered, sharpened distribution,
the prototype layer frozen for the first steps, the centers updated after the loss. The three
share the backbone, the views, the masks, the optimizer and the teacher's EMA; DINO's student
sees its global views unmasked, SOVE's and iBOT's masked. A loss whose weight is 0 is not
computed at all: a MIM-only step runs no local crops and draws no class judges, a [CLS]-only
step runs no head over patch tokens.
"""
import functools
import operator

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sove_jax import masks, memory, objective, optim, prototypes, views
from sove_jax.models import network

# Metrics that are schedule values at the step, not measurements (the trainer logs their last
# value, and the mean of the others, over a logging window).
SCHEDULE_METRICS = ("learning_rate", "weight_decay", "ema_momentum", "teacher_temp",
                    "teacher_patch_temp")


# The views' key is fold_in(state key, VIEWS_STREAM), the masks' fold_in(state key,
# MASKS_STREAM); the step's other keys come from split(state key) (fold_in(k, i) equals
# split(k, n)[i] for i < n: these constants are out of reach).
VIEWS_STREAM = 0x76696577
MASKS_STREAM = 0x6d61736b


def device_views(batch: dict, state_key, recipe: views.Recipe,
                 mask_recipe: masks.MaskRecipe | None = None, mask_sharding=None,
                 epoch=None) -> dict:
  """data.augment = "device": the batch with its views cut, and its masks drawn, on the device.

  `batch` holds "canvas" uint8 [B, C, C, ch] and "size" int32 [B, 2] (decoded images fitted
  into canvases), or "index" int32 [B] into "images" uint8 [N, H, W, ch] (an in-memory source
  living on the device); the views "global" and "local" (`views.make`) replace them, and, with
  `mask_recipe` and no "mask" in the batch, "mask" bool [B, 2, L] is drawn (`masks.draw`; its
  work split over the devices by `mask_sharding`, the batch's). Their keys come from the
  state's key, as every random draw of the step: a resumed run cuts the same views and masks.
  `epoch` (traced): the masks' start epoch applies (`masks.draw`). A batch of views made on the
  host passes through.
  """
  if "global" in batch:
    return batch
  batch = dict(batch)
  if mask_recipe is not None and "mask" not in batch:
    b = batch["index" if "index" in batch else "size"].shape[0]
    batch["mask"] = masks.draw(jax.random.fold_in(state_key, MASKS_STREAM), (b, 2), mask_recipe,
                               sharding=mask_sharding, epoch=epoch)
  if "index" in batch:
    images = batch.pop("images")
    canvases = jnp.take(images, batch.pop("index"), axis=0)
    sizes = jnp.broadcast_to(jnp.asarray(images.shape[1:3], jnp.int32), (canvases.shape[0], 2))
  else:
    canvases, sizes = batch.pop("canvas"), batch.pop("size")
  made = views.make(canvases, sizes, jax.random.fold_in(state_key, VIEWS_STREAM), recipe)
  return {**batch, **made}


def masks_for(config) -> masks.MaskRecipe:
  """The masks a device-mode step draws for `config`: at the backbone's final token grid."""
  grid = network.token_grid(config.model, config.data.global_size)
  return masks.MaskRecipe.from_config(config.data, grid)


def _kept_anchors(num_anchors: int, keep: float) -> int:
  return max(1, int(round(num_anchors * keep)))


def _task_judges(bank, key, *, num_anchors, keep, num_neighbors, smoothing, labels, chunk,
                 anchor_sharding):
  """One task's judges: `num_anchors` drawn, the first `keep` share kept as concepts.

  Every drawn anchor is excluded from the neighbor search (the authors' code: the
  permutation's head is the anchor set, the rest of the bank the candidates; docs/method.md,
  "Judges").
  """
  idx = objective.sample_anchors(key, bank.embeddings.shape[0], num_anchors)
  kept = idx[:_kept_anchors(num_anchors, keep)]
  return objective.select_judges(bank.embeddings, kept, num_neighbors, smoothing, labels,
                                 exclude_idx=idx, chunk_size=chunk,
                                 anchor_sharding=anchor_sharding)


def view_major(x, views: int):
  """[B * views, ...] (image-major, as the backbone ran) -> [views, B, ...]."""
  return jnp.swapaxes(x.reshape((-1, views) + x.shape[1:]), 0, 1)


def image_major(views):
  """[B, V, ...] views of each image -> [B * V, ...], the backbone's batch."""
  return views.reshape((-1,) + views.shape[2:])


def _agreement(student_log_probs, teacher_probs, num_global: int):
  """How often the student's choice for one global view is the teacher's for the other."""
  teacher_votes = jnp.argmax(teacher_probs, axis=-1)                          # [2, B]
  student_votes = jnp.argmax(student_log_probs[:num_global], axis=-1)
  return jnp.mean(student_votes[::-1] == teacher_votes)


class SoveParts:
  """SOVE's parts of the step: judges from the banks, eq. 2 and eq. 4, the banks' refill."""

  def __init__(self, config, schedules, anchor_sharding):
    self.s = config.sove
    self.schedules = schedules
    self.anchor_sharding = anchor_sharding
    self.uses_class = self.s.class_weight > 0
    self.uses_patches = self.s.patch_weight > 0
    self.masks_student = True

  def targets(self, state, teacher_cls, teacher_patches, key_cls, key_patch, step_number):
    """Each task draws its own concepts; the teacher's probabilities are targets, not
    differentiated."""
    s, temp = self.s, self.schedules.teacher_temp(step_number)
    cls_tasks = []
    for task in range(s.class_tasks if self.uses_class else 0):
      judges = _task_judges(state.class_bank, jax.random.fold_in(key_cls, task),
                            num_anchors=s.num_anchors, keep=s.anchor_keep,
                            num_neighbors=s.num_neighbors, smoothing=s.smoothing,
                            labels=s.labels, chunk=s.judge_chunk,
                            anchor_sharding=self.anchor_sharding)
      teacher_probs = jnp.exp(objective.concept_log_probs(teacher_cls, judges, temp))
      cls_tasks.append((judges, teacher_probs))
    patch_tasks = []
    for task in range(s.patch_tasks if self.uses_patches else 0):
      judges = _task_judges(state.patch_bank, jax.random.fold_in(key_patch, task),
                            num_anchors=s.patch_anchors, keep=1.0,
                            num_neighbors=s.patch_neighbors, smoothing=s.smoothing,
                            labels=s.labels, chunk=s.judge_chunk,
                            anchor_sharding=self.anchor_sharding)
      teacher_probs = jnp.exp(objective.concept_log_probs(teacher_patches, judges, temp))
      patch_tasks.append((judges, teacher_probs))
    return (cls_tasks, patch_tasks), dict(teacher_temp=temp)

  def losses(self, targets, student_cls, student_patches, mask_by_view, num_global):
    s = self.s
    cls_tasks, patch_tasks = targets
    losses, aux = {}, {}
    if self.uses_class:
      cls_per_example, agreement = 0.0, 0.0
      for judges, teacher_probs in cls_tasks:
        student_log_probs = objective.concept_log_probs(student_cls, judges, s.student_temp)
        cls_per_example += objective.class_loss_per_example(student_log_probs, teacher_probs)
        agreement += _agreement(student_log_probs, teacher_probs, num_global)
      cls_per_example /= len(cls_tasks)
      losses["cls_loss"] = (s.class_weight, jnp.mean(cls_per_example))
      aux["agreement"] = agreement / len(cls_tasks)
    if self.uses_patches:
      patch_per_example = 0.0
      for judges, teacher_probs in patch_tasks:
        student_log_probs = objective.concept_log_probs(student_patches, judges, s.student_temp)
        patch_per_example += objective.patch_loss_per_example(student_log_probs, teacher_probs,
                                                              mask_by_view)
      patch_per_example /= len(patch_tasks)
      losses["patch_loss"] = (s.patch_weight, jnp.mean(patch_per_example))
    return losses, aux

  def updates(self, updates, step_number):
    del step_number
    return updates

  def remember(self, state, teacher_cls, teacher_patches, key_enqueue):
    """After the loss, so a batch never judges itself: the teacher's view-2 global embedding
    and one random view-2 patch per image (docs/method.md, "Banks"). A run without the patch
    loss leaves the patch bank as it started."""
    new = dict(class_bank=memory.enqueue(state.class_bank, teacher_cls[1]))
    if self.uses_patches:
      batch_size = teacher_patches.shape[1]
      pick = jax.random.randint(key_enqueue, (batch_size,), 0, teacher_patches.shape[2])
      new["patch_bank"] = memory.enqueue(state.patch_bank, jnp.take_along_axis(
          teacher_patches[1], pick[:, None, None], axis=1)[:, 0])
    return new


class PrototypeParts:
  """DINO's and iBOT's parts of the step: centered, sharpened teacher targets over the
  prototypes, DINO's [CLS] loss (and iBOT's masked-patch loss), the frozen prototype layer,
  the centers' update."""

  def __init__(self, config, schedules):
    self.b = config.baseline
    self.schedules = schedules
    ibot = network.method(config) == "ibot"
    self.uses_class = self.b.class_weight > 0
    self.uses_patches = ibot and self.b.patch_weight > 0
    self.masks_student = ibot  # DINO's student sees its global views whole

  def targets(self, state, teacher_cls, teacher_patches, key_cls, key_patch, step_number):
    del key_cls, key_patch
    temp = self.schedules.teacher_temp(step_number)
    targets = dict(cls=(teacher_cls, state.centers["cls"], temp))
    probs = dict(cls=prototypes.teacher_probs(teacher_cls, state.centers["cls"], temp))
    info = dict(teacher_temp=temp)
    if self.uses_patches:
      patch_temp = self.schedules.teacher_patch_temp(step_number)
      targets["patch"] = (teacher_patches, state.centers["patch"], patch_temp)
      probs["patch"] = prototypes.teacher_probs(teacher_patches, state.centers["patch"],
                                                patch_temp)
      info["teacher_patch_temp"] = patch_temp
    # The two collapse modes (docs: `prototypes.teacher_entropies`), per kind of token.
    for name, p in probs.items():
      prefix = "teacher" if name == "cls" else "teacher_patch"
      info[f"{prefix}_entropy"], info[f"{prefix}_entropy_of_mean"] = (
          prototypes.teacher_entropies(p))
    return (targets, probs), info

  def losses(self, targets, student_cls, student_patches, mask_by_view, num_global):
    b = self.b
    targets, probs = targets
    losses, aux = {}, {}
    if self.uses_class:
      logits, center, temp = targets["cls"]
      per_example = prototypes.dino_loss_per_example(student_cls, logits, center,
                                                     teacher_temp=temp, student_temp=b.student_temp)
      losses["cls_loss"] = (b.class_weight, jnp.mean(per_example))
      aux["agreement"] = _agreement(student_cls, probs["cls"], num_global)
    if self.uses_patches:
      logits, center, temp = targets["patch"]
      per_example = prototypes.ibot_patch_loss_per_example(
          student_patches, logits, center, mask_by_view, teacher_temp=temp,
          student_temp=b.student_temp)
      losses["patch_loss"] = (b.patch_weight, jnp.mean(per_example))
    return losses, aux

  def updates(self, updates, step_number):
    """The prototype layer neither moves nor decays while frozen (`freeze_last_layer`)."""
    return prototypes.freeze_last_layer(updates, step_number,
                                        self.schedules.frozen_last_layer_steps)

  def remember(self, state, teacher_cls, teacher_patches, key_enqueue):
    """Each center moves towards this batch's mean teacher logits, after the loss."""
    del key_enqueue
    m = self.b.center_momentum
    centers = dict(state.centers)
    centers["cls"] = prototypes.update_center(centers["cls"], teacher_cls, m)
    if self.uses_patches:
      centers["patch"] = prototypes.update_center(centers["patch"], teacher_patches, m)
    return dict(centers=centers)


def make_train_step(config, graphdef, tx, schedules: optim.Schedules, *, anchor_sharding=None):
  """Builds the step for `config` (its method chosen here, once) and the network structure
  `graphdef`; `anchor_sharding` splits each SOVE judge search over the devices (see
  `objective.select_judges`)."""
  if network.method(config) == "sove":
    method = SoveParts(config, schedules, anchor_sharding)
  else:
    method = PrototypeParts(config, schedules)
  recipe = views.Recipe.from_config(config.data)
  mask_recipe = masks_for(config)

  def step(state, batch):
    # data.augment = "device"; else as it is
    epoch = (state.step // schedules.steps_per_epoch
             if mask_recipe is not None and mask_recipe.start_epoch else None)
    batch = device_views(batch, state.key, recipe, mask_recipe, anchor_sharding, epoch)
    new_key, key = jax.random.split(state.key)
    key_drop_global, key_drop_local, key_cls, key_patch, key_enqueue = jax.random.split(key, 5)
    step_number = state.step

    global_views = batch["global"]                                      # [B, 2, G, G, 3]
    num_global = global_views.shape[1]
    mask_by_view = jnp.swapaxes(batch["mask"], 0, 1)                    # [2, B, L]
    local_views = batch.get("local") if method.uses_class else None     # [B, N, S, S, 3]
    num_local = 0 if local_views is None else local_views.shape[1]

    # Teacher: unmasked global views, no drop-path, no gradient.
    teacher = nnx.merge(graphdef, state.teacher)
    teacher_cls, teacher_patches = teacher(image_major(global_views),
                                           patch_tokens=method.uses_patches)
    teacher_cls = jax.lax.stop_gradient(view_major(teacher_cls, num_global))          # [2, B, .]
    if method.uses_patches:
      teacher_patches = jax.lax.stop_gradient(view_major(teacher_patches, num_global))  # [2,B,L,.]
    targets, info = method.targets(state, teacher_cls, teacher_patches, key_cls, key_patch,
                                   step_number)

    def loss_fn(params):
      student = nnx.merge(graphdef, params)
      mask = image_major(batch["mask"]) if method.masks_student else None
      student_cls, student_patches = student(image_major(global_views), mask,
                                             key=key_drop_global,
                                             patch_tokens=method.uses_patches)
      student_cls = view_major(student_cls, num_global)
      if method.uses_patches:
        student_patches = view_major(student_patches, num_global)
      if num_local:
        local_cls, _ = student(image_major(local_views), key=key_drop_local, patch_tokens=False)
        student_cls = jnp.concatenate([student_cls, view_major(local_cls, num_local)])  # [V, B, .]
      losses, aux = method.losses(targets, student_cls, student_patches, mask_by_view,
                                  num_global)
      loss = functools.reduce(operator.add, [weight * value for weight, value in losses.values()])
      return loss, dict(aux, **{name: value for name, (_, value) in losses.items()})

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.student)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.student)
    updates = method.updates(updates, step_number)
    student = optax.apply_updates(state.student, updates)
    momentum = schedules.ema_momentum(step_number)
    teacher_params = optax.incremental_update(student, state.teacher, 1.0 - momentum)

    new = state.replace(step=step_number + 1, student=student, teacher=teacher_params,
                        opt_state=opt_state, key=new_key,
                        **method.remember(state, teacher_cls, teacher_patches, key_enqueue))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = dict(loss=loss, **aux, **info, learning_rate=schedules.learning_rate(step_number),
                   weight_decay=schedules.weight_decay(step_number), ema_momentum=momentum,
                   grad_norm=grad_norm, finite=finite)
    return new, metrics

  return step
