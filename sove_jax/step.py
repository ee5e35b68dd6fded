"""The pure SOVE train step: views -> networks -> objective -> gradients -> update -> EMA -> banks.

`make_train_step` returns `step(state, batch) -> (state, metrics)`, a pure function of arrays;
all randomness comes from the state's key. The trainer jits it over the mesh with the state
donated. A non-finite loss leaves the state as it was (and says so in the metrics), so the
host can stop the run without a poisoned state ever reaching a checkpoint.
"""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sove_jax import memory, objective, optim
from sove_jax.state import TrainState


def _kept_anchors(num_anchors: int, keep: float) -> int:
  return max(1, int(round(num_anchors * keep)))


def _task_judges(bank, key, *, num_anchors, keep, num_neighbors, smoothing, labels, chunk,
                 anchor_sharding):
  """One task's judges: `num_anchors` drawn, the first `keep` share kept as concepts.

  Every drawn anchor is excluded from the neighbour search (official code: the permutation's
  head is the anchor set, the rest of the bank the candidates).
  """
  idx = objective.sample_anchors(key, bank.embeddings.shape[0], num_anchors)
  kept = idx[:_kept_anchors(num_anchors, keep)]
  return objective.select_judges(bank.embeddings, kept, num_neighbors, smoothing, labels,
                                 exclude_idx=idx, chunk_size=chunk,
                                 anchor_sharding=anchor_sharding)


def _view_major(x, views: int):
  """[B * views, ...] (image-major, as the backbone ran) -> [views, B, ...]."""
  return jnp.swapaxes(x.reshape((-1, views) + x.shape[1:]), 0, 1)


def make_train_step(config, graphdef, tx, schedules: optim.Schedules, *, anchor_sharding=None,
                    mode: str = "full"):
  """Builds the step. `mode="backbone"` keeps crops, networks and optimizer, drops the objective
  (a trivial cosine loss, no banks): the ceiling any SSL step could reach, for benchmarks."""
  s = config.sove
  if mode not in ("full", "backbone"):
    raise ValueError(f"mode={mode!r} must be 'full' or 'backbone'")

  def step(state: TrainState, batch):
    new_key, key = jax.random.split(state.key)
    k_drop_g, k_drop_l, k_cls, k_patch, k_enq = jax.random.split(key, 5)
    step_no = state.step
    tau_t = schedules.teacher_temp(step_no)

    glob = batch["global"]
    b, nv = glob.shape[0], glob.shape[1]
    g_flat = glob.reshape((b * nv,) + glob.shape[2:])
    m_flat = batch["mask"].reshape(b * nv, -1)
    mask_vm = jnp.swapaxes(batch["mask"], 0, 1)                       # [2, B, L]
    local = batch.get("local")
    n_local = 0 if local is None else local.shape[1]

    # Teacher: unmasked global views, no drop-path, no gradient.
    teacher = nnx.merge(graphdef, state.teacher)
    t_cls, t_patch = teacher(g_flat)
    t_cls = jax.lax.stop_gradient(_view_major(t_cls, nv))               # [2, B, d]
    t_patch = jax.lax.stop_gradient(_view_major(t_patch, nv))           # [2, B, L, d]

    if mode == "full":
      cls_tasks = []
      for t in range(s.class_tasks):
        judges = _task_judges(state.class_bank, jax.random.fold_in(k_cls, t),
                              num_anchors=s.num_anchors, keep=s.anchor_keep,
                              num_neighbors=s.num_neighbors, smoothing=s.smoothing,
                              labels=s.labels, chunk=s.judge_chunk,
                              anchor_sharding=anchor_sharding)
        t_probs = jnp.exp(objective.concept_log_probs(t_cls, judges, tau_t))
        cls_tasks.append((judges, t_probs))
      patch_tasks = []
      for t in range(s.patch_tasks):
        judges = _task_judges(state.patch_bank, jax.random.fold_in(k_patch, t),
                              num_anchors=s.patch_anchors, keep=1.0,
                              num_neighbors=s.patch_neighbors, smoothing=s.smoothing,
                              labels=s.labels, chunk=s.judge_chunk,
                              anchor_sharding=anchor_sharding)
        patch_tasks.append((judges, jnp.exp(objective.concept_log_probs(t_patch, judges, tau_t))))

    def loss_fn(params):
      student = nnx.merge(graphdef, params)
      s_cls_g, s_patch = student(g_flat, m_flat, key=k_drop_g)
      s_cls = _view_major(s_cls_g, nv)
      s_patch = _view_major(s_patch, nv)
      if n_local:
        l_flat = local.reshape((b * n_local,) + local.shape[2:])
        s_cls_l, _ = student(l_flat, key=k_drop_l, patch_tokens=False)
        s_cls = jnp.concatenate([s_cls, _view_major(s_cls_l, n_local)], axis=0)  # [V, B, d]
      if mode == "backbone":
        sim = jnp.einsum("vbd,wbd->b", s_cls[:nv], t_cls) / (nv * nv)
        loss = -jnp.mean(sim)
        return loss, dict(cls_loss=loss, patch_loss=jnp.zeros(()), agreement=jnp.zeros(()))
      cls_pe = 0.0
      agreement = 0.0
      for judges, t_probs in cls_tasks:
        s_logp = objective.concept_log_probs(s_cls, judges, s.student_temp)
        cls_pe = cls_pe + objective.class_loss_per_example(s_logp, t_probs)
        t_arg = jnp.argmax(t_probs, axis=-1)                             # [2, B]
        s_arg = jnp.argmax(s_logp[:nv], axis=-1)
        agreement = agreement + jnp.mean(s_arg[::-1] == t_arg)          # cross-view votes agree
      cls_pe = cls_pe / len(cls_tasks)
      patch_pe = 0.0
      for judges, t_probs in patch_tasks:
        s_logp = objective.concept_log_probs(s_patch, judges, s.student_temp)
        patch_pe = patch_pe + objective.patch_loss_per_example(s_logp, t_probs, mask_vm)
      patch_pe = patch_pe / max(len(patch_tasks), 1)
      cls_l, patch_l = jnp.mean(cls_pe), jnp.mean(patch_pe)
      loss = s.class_weight * cls_l + s.patch_weight * patch_l
      return loss, dict(cls_loss=cls_l, patch_loss=patch_l,
                        agreement=agreement / len(cls_tasks))

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.student)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.student)
    student = optax.apply_updates(state.student, updates)
    momentum = schedules.ema_momentum(step_no)
    teacher_params = optax.incremental_update(student, state.teacher, 1.0 - momentum)

    class_bank, patch_bank = state.class_bank, state.patch_bank
    if mode == "full":
      # After the loss: the teacher's view-2 [CLS] and one random view-2 patch per image.
      class_bank = memory.enqueue(class_bank, t_cls[1])
      pick = jax.random.randint(k_enq, (b,), 0, t_patch.shape[2])
      patch_bank = memory.enqueue(patch_bank, jnp.take_along_axis(
          t_patch[1], pick[:, None, None], axis=1)[:, 0])

    new = TrainState(step=step_no + 1, student=student, teacher=teacher_params,
                     opt_state=opt_state, class_bank=class_bank, patch_bank=patch_bank,
                     key=new_key)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = dict(loss=loss, **aux, learning_rate=schedules.learning_rate(step_no),
                   weight_decay=schedules.weight_decay(step_no), ema_momentum=momentum,
                   teacher_temp=tau_t, grad_norm=grad_norm, finite=finite)
    return new, metrics

  return step
