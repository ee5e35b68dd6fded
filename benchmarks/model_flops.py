r"""Compiled forward FLOPs of the ViT and Swin backbones against the analytic count.

FLOPs here are 2 x multiply-adds (papers that quote "FLOPs" for Swin count multiply-adds: Swin-T's
4.5 G at 224 px is 9.0 GFLOP here). XLA's cost analysis of the compiled forward (lowered from
abstract inputs, nothing is run) should match 2 x the multiply-adds of the patch embedding, the
projections, the MLPs and the two attention products (for Swin, per window, over the grid padded
to whole windows as the model computes it, plus the patch mergings). What XLA adds on top is
elementwise: the exact (erf) GELU alone is ~70 FLOPs per element on XLA:CPU, about 3% of ViT-S;
the rest is LayerNorm, softmax and residuals. A larger gap means the model computes something
it should not, or misses something. Swin's narrow early stages weigh the GELU more (70 x 4C
elementwise against ~24C^2 matmul FLOPs per token at C = 96): ~0.4 GFLOP, 4.5% of Swin-T at
224 px, so its check allows 8%.

The checked figure is per image at batch 32: the float32 -> bf16 cast of every weight is paid
once per call, not per image (at batch 1 it adds ~2.5% at 96 px); the batch-1 figure is shown
too. Blocks are unrolled here, since XLA counts a scanned loop body once.

    python benchmarks/model_flops.py   # ViT-S/16, ViT-B/16, Swin-T/7 and Swin-T/14 at 224 and 96 px
    python benchmarks/model_flops.py --variants s,b,l --swin t --sizes 224,96
    python benchmarks/model_flops.py --variants "" --swin t/14   # the paper's Swin-T/14 only
"""
import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
from sove_jax.models import SWIN_VARIANTS, VARIANTS, create_swin, create_vit

# Published per-image forward cost in GFLOP (2 x multiply-adds), to check the formula itself.
# Swin-T: 4.5 G multiply-adds at 224 px (Liu et al. 2021, Table 1).
REFERENCE_GFLOP = {("s", 224): 9.2, ("s", 96): 1.6, ("b", 224): 35.1, ("b", 96): 6.4,
                   ("swin_t", 224): 9.0}  # window 7; no published figure for window 14
TOLERANCE = {"vit": 0.05, "swin": 0.08}


def analytic_flops(width: int, depth: int, *, patch: int = 16, height: int = 224,
                   width_px: int | None = None, channels: int = 3, mlp_ratio: float = 4.0) -> float:
  """2 x multiply-adds of one image's forward pass through the backbone."""
  width_px = height if width_px is None else width_px
  patches = (height // patch) * (width_px // patch)
  tokens = patches + 1
  hidden = int(width * mlp_ratio)
  embed = patches * patch * patch * channels * width
  per_block = (tokens * (4 * width * width + 2 * width * hidden)  # qkv, proj, fc1, fc2
               + 2 * tokens * tokens * width)  # q.k and p.v over all heads
  return 2.0 * (embed + depth * per_block)


def swin_analytic_flops(model, height: int, width_px: int, channels: int = 3,
                        mlp_ratio: float = 4.0) -> float:
  """2 x multiply-adds of one image through a Swin backbone, windows as the model runs them.

  Attention projections and products run over the grid padded to whole windows (as iBOT's
  Swin pads 96 px crops); the MLP over the real tokens; merging over the grid padded to even.
  """
  p = model.patch_size
  h, w = height // p, width_px // p
  total = h * w * p * p * channels * model.embed_dim
  for stage, (depth, (window, _)) in enumerate(zip(model.depths, model.windows)):
    c = model.widths[stage]
    hp, wp = -(-h // window) * window, -(-w // window) * window
    n = window * window
    per_block = (hp * wp * 4 * c * c                      # qkv, proj (padded tokens too)
                 + (hp * wp // n) * 2 * n * n * c         # q.k and p.v in every window
                 + h * w * 2 * c * int(c * mlp_ratio))    # fc1, fc2
    total += depth * per_block
    if stage < len(model.depths) - 1:
      h, w = -(-h // 2), -(-w // 2)
      total += h * w * 4 * c * 2 * c                      # merging: 4C -> 2C
  return 2.0 * total


def build(variant: str):
  """Abstract backbone: "swin_<v>" or "swin_<v>/<window>" for Swin, else a ViT variant."""
  if variant.startswith("swin_"):
    name, _, window = variant[len("swin_"):].partition("/")
    return nnx.eval_shape(lambda: create_swin(name, window_size=int(window or 7),
                                              rngs=nnx.Rngs(0)))
  return nnx.eval_shape(lambda: create_vit(variant, rngs=nnx.Rngs(0)))


def compiled_flops(variant: str, size: int, batch: int) -> float:
  """FLOPs per image XLA reports for the compiled forward; the model stays abstract."""
  model = build(variant)
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  cost = forward.lower(params, images).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0]
  return float(cost["flops"]) / batch


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default="s,b", help="ViT variants; empty for none")
  parser.add_argument("--swin", default="t,t/14",
                      help=f"Swin variants of {sorted(SWIN_VARIANTS)}, '/W' for window W "
                      "(default 7); empty for none")
  parser.add_argument("--sizes", default="224,96")
  parser.add_argument("--batch", type=int, default=32)
  args = parser.parse_args(argv)
  rows, ok = [], True
  variants = [v for v in args.variants.split(",") if v]
  variants += [f"swin_{v}" for v in args.swin.split(",") if v]
  for variant in variants:
    for size in (int(s) for s in args.sizes.split(",")):
      start = time.perf_counter()
      compiled = compiled_flops(variant, size, args.batch)
      seconds = time.perf_counter() - start
      single = compiled_flops(variant, size, 1)
      if variant.startswith("swin_"):
        model = build(variant)
        analytic = swin_analytic_flops(model, size, size)
        name, tokens = f"Swin-{variant[5:].partition('/')[0].upper()}/{model.windows[0][0]}", \
            model.token_grid(size, size)
        tokens = 1 + tokens[0] * tokens[1]
      else:
        width, depth, _ = VARIANTS[variant]
        analytic = analytic_flops(width, depth, height=size)
        name, tokens = f"ViT-{variant.upper()}/16", (size // 16) ** 2 + 1
      ratio = compiled / analytic
      ref = REFERENCE_GFLOP.get((variant, size))
      ref_ok = ref is None or abs(analytic / 1e9 - ref) <= 0.05 + 1e-9
      tolerance = TOLERANCE["swin" if variant.startswith("swin_") else "vit"]
      good = abs(ratio - 1) <= tolerance and ref_ok
      ok &= good
      rows.append((name, size, tokens,
                   "-" if ref is None else f"{ref:.1f}", f"{analytic / 1e9:.2f}",
                   f"{compiled / 1e9:.2f}", f"{ratio:.4f}", f"{single / analytic:.4f}",
                   f"{seconds:.0f}",
                   "ok" if good else "FAIL"))
  header = ("model", "px", "tokens", "ref GFLOP", "analytic", "compiled", "compiled/analytic",
            "same at batch 1", "compile s", "within tolerance")
  widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
  line = lambda r: " | ".join(str(c).rjust(w) for c, w in zip(r, widths))
  print(line(header))
  print("-+-".join("-" * w for w in widths))
  for r in rows:
    print(line(r))
  print(f"GFLOP per image; compiled at batch {args.batch}; backend {jax.default_backend()}, "
        f"jax {jax.__version__}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
