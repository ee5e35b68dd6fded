"""The pure SOVE train step: views -> networks -> objective -> gradients -> update -> EMA -> banks.

`make_train_step` returns `step(state, batch) -> (state, metrics)`, a pure function of arrays;
all randomness comes from the state's key. With data.augment = "device" the batch holds uint8
images and the step cuts the views first (`device_views`). The trainer jits it over the mesh
with the state donated. A non-finite loss leaves the state as it was (and says so in the
metrics), so the host can stop the run without a poisoned state ever reaching a checkpoint. The
method is docs/method.md; the losses are the paper's eq. 2 ([CLS]) and eq. 4 (patches).
"""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sove_jax import memory, objective, optim, views
from sove_jax.state import TrainState

# Metrics that are schedule values at the step, not measurements (the trainer logs their last
# value, and the mean of the others, over a logging window).
SCHEDULE_METRICS = ("learning_rate", "weight_decay", "ema_momentum", "teacher_temp")


# The views' key is fold_in(state key, VIEWS_STREAM); the step's other keys come from
# split(state key) (fold_in(k, i) equals split(k, n)[i] for i < n: this constant is out of reach).
VIEWS_STREAM = 0x76696577


def device_views(batch: dict, state_key, recipe: views.Recipe) -> dict:
  """data.augment = "device": the batch with its views cut on the device from uint8 images.

  `batch` holds "canvas" uint8 [B, C, C, ch] and "size" int32 [B, 2] (decoded images fitted
  into canvases), or "index" int32 [B] into "images" uint8 [N, H, W, ch] (an in-memory source
  living on the device); the views "global" and "local" (`views.make`) replace them. Their key
  comes from the state's key, as every random draw of the step: a resumed run cuts the same
  views. A batch of views made on the host passes through.
  """
  if "global" in batch:
    return batch
  batch = dict(batch)
  if "index" in batch:
    images = batch.pop("images")
    canvases = jnp.take(images, batch.pop("index"), axis=0)
    sizes = jnp.broadcast_to(jnp.asarray(images.shape[1:3], jnp.int32), (canvases.shape[0], 2))
  else:
    canvases, sizes = batch.pop("canvas"), batch.pop("size")
  made = views.make(canvases, sizes, jax.random.fold_in(state_key, VIEWS_STREAM), recipe)
  return {**batch, **made}


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


def make_train_step(config, graphdef, tx, schedules: optim.Schedules, *, anchor_sharding=None):
  """Builds the step for `config` and the network structure `graphdef`; `anchor_sharding`
  splits each judge search over the devices (see `objective.select_judges`)."""
  s = config.sove
  recipe = views.Recipe.from_config(config.data)

  def step(state: TrainState, batch):
    batch = device_views(batch, state.key, recipe)  # data.augment = "device"; else as it is

    new_key, key = jax.random.split(state.key)
    key_drop_global, key_drop_local, key_cls, key_patch, key_enqueue = jax.random.split(key, 5)
    step_number = state.step
    teacher_temp = schedules.teacher_temp(step_number)

    global_views = batch["global"]                                      # [B, 2, G, G, 3]
    batch_size, num_global = global_views.shape[:2]
    mask_by_view = jnp.swapaxes(batch["mask"], 0, 1)                    # [2, B, L]
    local_views = batch.get("local")                                    # [B, N, S, S, 3]
    num_local = 0 if local_views is None else local_views.shape[1]

    # Teacher: unmasked global views, no drop-path, no gradient.
    teacher = nnx.merge(graphdef, state.teacher)
    teacher_cls, teacher_patches = teacher(image_major(global_views))
    teacher_cls = jax.lax.stop_gradient(view_major(teacher_cls, num_global))          # [2, B, d]
    teacher_patches = jax.lax.stop_gradient(view_major(teacher_patches, num_global))  # [2, B, L, d]

    # Each task draws its own concepts; the teacher's probabilities are targets, not differentiated.
    cls_tasks = []
    for task in range(s.class_tasks):
      judges = _task_judges(state.class_bank, jax.random.fold_in(key_cls, task),
                            num_anchors=s.num_anchors, keep=s.anchor_keep,
                            num_neighbors=s.num_neighbors, smoothing=s.smoothing,
                            labels=s.labels, chunk=s.judge_chunk, anchor_sharding=anchor_sharding)
      teacher_probs = jnp.exp(objective.concept_log_probs(teacher_cls, judges, teacher_temp))
      cls_tasks.append((judges, teacher_probs))
    patch_tasks = []
    for task in range(s.patch_tasks):
      judges = _task_judges(state.patch_bank, jax.random.fold_in(key_patch, task),
                            num_anchors=s.patch_anchors, keep=1.0,
                            num_neighbors=s.patch_neighbors, smoothing=s.smoothing,
                            labels=s.labels, chunk=s.judge_chunk, anchor_sharding=anchor_sharding)
      teacher_probs = jnp.exp(objective.concept_log_probs(teacher_patches, judges, teacher_temp))
      patch_tasks.append((judges, teacher_probs))

    def loss_fn(params):
      student = nnx.merge(graphdef, params)
      student_cls, student_patches = student(image_major(global_views),
                                             image_major(batch["mask"]), key=key_drop_global)
      student_cls = view_major(student_cls, num_global)
      student_patches = view_major(student_patches, num_global)
      if num_local:
        local_cls, _ = student(image_major(local_views), key=key_drop_local, patch_tokens=False)
        student_cls = jnp.concatenate([student_cls, view_major(local_cls, num_local)])  # [V, B, d]

      cls_per_example, agreement = 0.0, 0.0
      for judges, teacher_probs in cls_tasks:
        student_log_probs = objective.concept_log_probs(student_cls, judges, s.student_temp)
        cls_per_example += objective.class_loss_per_example(student_log_probs, teacher_probs)
        teacher_votes = jnp.argmax(teacher_probs, axis=-1)                          # [2, B]
        student_votes = jnp.argmax(student_log_probs[:num_global], axis=-1)
        agreement += jnp.mean(student_votes[::-1] == teacher_votes)  # across the two views
      cls_per_example /= len(cls_tasks)
      patch_per_example = 0.0
      for judges, teacher_probs in patch_tasks:
        student_log_probs = objective.concept_log_probs(student_patches, judges, s.student_temp)
        patch_per_example += objective.patch_loss_per_example(student_log_probs, teacher_probs,
                                                              mask_by_view)
      patch_per_example /= max(len(patch_tasks), 1)
      cls_loss, patch_loss = jnp.mean(cls_per_example), jnp.mean(patch_per_example)
      loss = s.class_weight * cls_loss + s.patch_weight * patch_loss
      return loss, dict(cls_loss=cls_loss, patch_loss=patch_loss,
                        agreement=agreement / len(cls_tasks))

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.student)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.student)
    student = optax.apply_updates(state.student, updates)
    momentum = schedules.ema_momentum(step_number)
    teacher_params = optax.incremental_update(student, state.teacher, 1.0 - momentum)

    # After the loss, so a batch never judges itself: the teacher's view-2 [CLS] and one random
    # view-2 patch per image (docs/method.md, "Banks").
    class_bank = memory.enqueue(state.class_bank, teacher_cls[1])
    pick = jax.random.randint(key_enqueue, (batch_size,), 0, teacher_patches.shape[2])
    patch_bank = memory.enqueue(state.patch_bank, jnp.take_along_axis(
        teacher_patches[1], pick[:, None, None], axis=1)[:, 0])

    new = TrainState(step=step_number + 1, student=student, teacher=teacher_params,
                     opt_state=opt_state, class_bank=class_bank, patch_bank=patch_bank,
                     key=new_key)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = dict(loss=loss, **aux, learning_rate=schedules.learning_rate(step_number),
                   weight_decay=schedules.weight_decay(step_number), ema_momentum=momentum,
                   teacher_temp=teacher_temp, grad_norm=grad_norm, finite=finite)
    return new, metrics

  return step
