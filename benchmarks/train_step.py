r"""Train-step benchmark: compiled FLOPs against the analytic count, step time, images/s, MFU.

    python benchmarks/train_step.py                 # the default config on this machine (CPU)
    python benchmarks/train_step.py --gpu           # ViT-S/16 and ViT-B/16, paper multi-crop,
                                                    # batch 128, synthetic on-device batches
    python benchmarks/train_step.py --gpu --attention=cudnn --archs=s
    python benchmarks/train_step.py --gpu --archs=s --augment=host,device   # the views' cost

Each row times `--steps` steps after `--warmup` (compile included in warm-up), the full SOVE step
and, for comparison, the backbone-only step defined here (same crops, networks, optimizer and
EMA; no banks or objective). MFU uses the analytic FLOPs and the card's dense bf16 peak.
Synthetic batches follow data.augment (the config's, or each of `--augment`): with "device"
(the ImageNet configs) they are uint8 canvases filled whole (512 x 512 for ViT-S/16 and
ViT-B/16) and each step cuts its views on the device (sove_jax/views.py), whose FLOPs the
compiled count includes and the analytic one does not; with "host" they are the float32 views.
`--augment=host,device` times both steps side by side, so the rows' ratio is what making the
views costs the accelerator.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from configs import default, vitb, vits  # noqa: E402
from sove_jax import sharding, state as state_lib, train, views  # noqa: E402
from sove_jax.models import network  # noqa: E402
from sove_jax import step as step_lib  # noqa: E402
from sove_jax.state import TrainState  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "TPU v4": 275.0,
                    "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0}


def vit_flops(tokens: int, width: int, depth: int, patch: int, mlp_ratio: float = 4.0) -> float:
  """Forward FLOPs of a ViT on one image with `tokens` tokens ([CLS] included)."""
  embed = 2 * (tokens - 1) * patch * patch * 3 * width
  block = (2 * tokens * width * 3 * width + 4 * tokens * tokens * width
           + 2 * tokens * width * width + 4 * tokens * width * int(mlp_ratio * width))
  return embed + depth * block


def head_flops(tokens: int, width: int, hidden: int, out: int) -> float:
  return 2 * tokens * (width * hidden + hidden * hidden + hidden * out)


def step_flops_per_image(c, mode: str = "full") -> float:
  """Analytic FLOPs of one train step, per image (backward = 2 x forward)."""
  m, d, s = c.model, c.data, c.sove
  width, depth, _ = network.vit_size(m)
  n_g = (d.global_size // m.patch_size) ** 2 + 1
  n_l = (d.local_size // m.patch_size) ** 2 + 1
  global_view = (vit_flops(n_g, width, depth, m.patch_size)
                 + head_flops(n_g, width, m.head_hidden, m.head_out))
  local_view = (vit_flops(n_l, width, depth, m.patch_size)
                + head_flops(1, width, m.head_hidden, m.head_out))
  student = 3 * (2 * global_view + d.num_local * local_view)
  teacher = 2 * global_view
  total = student + teacher
  if mode == "full":
    dim, views = m.head_out, 2 + d.num_local
    kept = max(1, round(s.num_anchors * s.anchor_keep))
    judges = kept * (s.num_neighbors + 1)
    search = 2 * kept * s.class_bank_size * dim if s.num_neighbors else 0
    total += s.class_tasks * (search / c.batch_size + 2 * dim * judges * (2 + 3 * views))
    p_judges = s.patch_anchors * (s.patch_neighbors + 1)
    p_search = 2 * s.patch_anchors * s.patch_bank_size * dim if s.patch_neighbors else 0
    total += s.patch_tasks * (p_search / c.batch_size + 2 * dim * p_judges * (n_g - 1) * 2 * 4)
  return float(total)


def make_backbone_step(config, graphdef, tx, schedules, *, anchor_sharding=None):
  """The SOVE step without its objective: the same crops, student and teacher forwards (heads
  on every token), optimizer and EMA, and a trivial loss (cosine between student and teacher
  [CLS] of the global views) instead of judges and banks: the ceiling of any such SSL step."""
  recipe, mask_recipe = views.Recipe.from_config(config.data), step_lib.masks_for(config)

  def step(state: TrainState, batch):
    # data.augment = "device": the views and masks, as the SOVE step makes them
    batch = step_lib.device_views(batch, state.key, recipe, mask_recipe, anchor_sharding)
    new_key, key = jax.random.split(state.key)
    key_drop_global, key_drop_local = jax.random.split(key)
    global_views, local_views = batch["global"], batch.get("local")
    num_global = global_views.shape[1]
    teacher = nnx.merge(graphdef, state.teacher)
    teacher_cls, teacher_patches = jax.lax.stop_gradient(
        teacher(step_lib.image_major(global_views)))
    teacher_cls = step_lib.view_major(teacher_cls, num_global)

    def loss_fn(params):
      student = nnx.merge(graphdef, params)
      student_cls, student_patches = student(step_lib.image_major(global_views),
                                             step_lib.image_major(batch["mask"]),
                                             key=key_drop_global)
      similarity = jnp.einsum("vbd,wbd->b", step_lib.view_major(student_cls, num_global),
                              teacher_cls) / (num_global * num_global)
      # What the SOVE step computes but this loss does not read stays in the graph (x 0).
      unread = jnp.mean(student_patches) + jnp.mean(teacher_patches)
      if local_views is not None:
        local_cls, _ = student(step_lib.image_major(local_views), key=key_drop_local,
                               patch_tokens=False)
        unread += jnp.mean(local_cls)
      return -jnp.mean(similarity) + 0.0 * unread

    loss, grads = jax.value_and_grad(loss_fn)(state.student)
    updates, opt_state = tx.update(grads, state.opt_state, state.student)
    student = optax.apply_updates(state.student, updates)
    momentum = schedules.ema_momentum(state.step)
    teacher_params = optax.incremental_update(student, state.teacher, 1.0 - momentum)
    new = state.replace(step=state.step + 1, student=student, teacher=teacher_params,
                        opt_state=opt_state, key=new_key)
    return new, dict(loss=loss)

  return step


STEPS = {"full": step_lib.make_train_step, "backbone": make_backbone_step}


def synthetic_batch(shapes: dict, key):
  """A random global batch of `shapes` (`train.batch_shapes`) created on the devices (no host
  transfer in the timed loop): views, or uint8 canvases filled whole (sizes: the canvas), or
  device-resident images and indices into them."""

  @jax.jit
  def make(key):
    ks = jax.random.split(key, len(shapes))
    out = {}
    for k, (name, sds) in zip(ks, sorted(shapes.items())):
      if sds.dtype == jnp.bool_:
        out[name] = jax.random.bernoulli(k, 0.3, sds.shape)
      elif name == "size":
        out[name] = jnp.broadcast_to(jnp.asarray(shapes["canvas"].shape[1:3], jnp.int32),
                                     sds.shape)
      elif name == "index":
        out[name] = jax.random.randint(k, sds.shape, 0, shapes["images"].shape[0])
      elif sds.dtype == jnp.int32:
        out[name] = jnp.zeros(sds.shape, jnp.int32)
      elif sds.dtype == jnp.uint8:
        out[name] = jax.random.randint(k, sds.shape, 0, 256).astype(jnp.uint8)
      else:
        out[name] = jax.random.normal(k, sds.shape, jnp.float32)
    return jax.lax.with_sharding_constraint(out, jax.tree.map(lambda s: s.sharding, shapes))

  return make(key)


class Timed:
  """One config's step compiled ahead of time on a synthetic batch, then timed in rounds.

  Each `round` appends its wall and CPU seconds a step (CPU time, all threads of this process,
  is the steadier figure on a machine shared with other work: wall time then includes waiting
  for a core). recipe_speed.py alternates rounds between several of these; `bench` takes one.
  """

  def __init__(self, c, mode: str = "full"):
    mesh = sharding.make_mesh(c.mesh)
    setup = train.build(c, mesh, steps_per_epoch=1000, make_step=STEPS[mode])
    self.state = state_lib.create(c, setup.tx, setup.layout, setup.image_size)
    self.batch = synthetic_batch(setup.batch, jax.random.PRNGKey(1))
    self.step = setup.step.lower(state_lib.abstract_with_shardings(setup.layout),
                                 self.batch).compile()
    cost = self.step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # The compiled count is per device; the batch is global.
    self.flops_per_image = (float(cost.get("flops", float("nan"))) if cost else float("nan")
                            ) * mesh.devices.size / c.batch_size
    mem = self.step.memory_analysis()
    self.temp_gib = mem.temp_size_in_bytes / 2**30 if mem else float("nan")
    self.batch_size = c.batch_size
    self.wall, self.cpu, self.metrics = [], [], None

  def round(self, steps: int, warmup: int):
    for _ in range(warmup):
      self.state, self.metrics = self.step(self.state, self.batch)
    jax.block_until_ready(self.metrics)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
      self.state, self.metrics = self.step(self.state, self.batch)
    jax.block_until_ready(self.metrics)
    self.wall.append((time.perf_counter() - t0) / steps)
    self.cpu.append((time.process_time() - cpu0) / steps)


def bench(c, mode: str, steps: int, warmup: int):
  t = Timed(c, mode)
  t.round(steps, warmup)
  return dict(ms=t.wall[0] * 1e3, cpu_ms=t.cpu[0] * 1e3, ips=c.batch_size / t.wall[0],
              flops_img_compiled=t.flops_per_image,
              flops_img_analytic=step_flops_per_image(c, mode), temp_gib=t.temp_gib,
              loss=float(t.metrics["loss"]))


def peak_tflops():
  kind = jax.devices()[0].device_kind
  for name, tf in PEAK_BF16_TFLOPS.items():
    if name.lower() in kind.lower():
      return kind, tf * jax.device_count()
  return kind, float("nan")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gpu", action="store_true", help="ViT-S/B paper multi-crop, batch 128")
  p.add_argument("--archs", default="s,b")
  p.add_argument("--attention", default="xla", choices=["xla", "cudnn"])
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--modes", default="full,backbone")
  p.add_argument("--json", default="", help="also append each row as a JSON line to this file")
  p.add_argument("--augment", default="",
                 help="comma-separated data.augment values to time (host, device); "
                      "default: the config's (device for ViT-S/B, host for the default config)")
  a = p.parse_args()

  def variants(c):  # (label suffix, config) for each data.augment asked for
    augments = a.augment.split(",") if a.augment else [c.data.augment]
    out = []
    for augment in augments:
      v = c.copy_and_resolve_references()
      v.data.augment = augment
      if augment == "device" and not v.data.canvas_size and v.data.source != "fashion_mnist":
        v.data.canvas_size = 512
      out.append((f", views on the {augment}", v))
    return out

  rows = []
  if a.gpu:
    for arch in a.archs.split(","):
      c = {"s": vits, "b": vitb}[arch].get_config()
      c.batch_size = a.batch
      c.model.attention = a.attention
      for mode in a.modes.split(","):
        for suffix, v in variants(c):
          rows.append((f"ViT-{arch.upper()}/16 {mode}{suffix}", v, mode))
    steps = a.steps or 20
  else:
    c = default.get_config()
    width, depth, _ = network.vit_size(c.model)
    for mode in a.modes.split(","):
      for suffix, v in variants(c):
        rows.append((f"default (width {width}, depth {depth}) {mode}{suffix}", v, mode))
    steps = a.steps or 10

  kind, peak = peak_tflops()
  print(f"# {jax.device_count()} x {kind}; jax {jax.__version__}; batch {rows[0][1].batch_size}; "
        f"{rows[0][1].data.num_local} local crops; attention {a.attention}")
  print("| step | ms/step | CPU ms/step | images/s | GFLOP/img compiled | GFLOP/img analytic | "
        "ratio | MFU | temp GiB |")
  print("|---|---|---|---|---|---|---|---|---|")
  for name, c, mode in rows:
    r = bench(c, mode, steps, a.warmup)
    mfu = r["flops_img_analytic"] * r["ips"] / (peak * 1e12)
    if a.json:
      with open(a.json, "a") as f:
        f.write(json.dumps({"name": name, "mode": mode, "device": kind, "jax": jax.__version__,
                            "batch": c.batch_size, "local_crops": c.data.num_local,
                            "attention": c.model.attention, "augment": c.data.augment,
                            "steps": steps, "mfu": mfu, **r}) + "\n")
    print(f"| {name} | {r['ms']:.1f} | {r['cpu_ms']:.0f} | {r['ips']:.0f} | {r['flops_img_compiled'] / 1e9:.2f} | "
          f"{r['flops_img_analytic'] / 1e9:.2f} | "
          f"{r['flops_img_compiled'] / r['flops_img_analytic']:.3f} | "
          f"{mfu * 100:.1f}% | {r['temp_gib']:.2f} |", flush=True)


if __name__ == "__main__":
  main()
