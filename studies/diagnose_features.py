"""Which features of a trained run carry the most class information? (a study stage)

    python studies/diagnose_features.py --workdir=WORKDIR [--train=10000 --test=2000]
    python studies/diagnose_features.py --workdir=WORKDIR --train_split=train-minival \
        --eval_split=minival       # a reading that must not look at the test split

k-NN top-1 (k = 20) on Fashion-MNIST subsets for several features of the checkpoint's teacher and
student (backbone [CLS], mean patch token, both, the head's embedding, every block's [CLS]), and
the effective rank (exp of the singular-value entropy) of each feature set: a table on stdout
and WORKDIR/features.json. As a stage of a study file (studies/learning_curve.py):
`dict(name="features", kind="command", command=["{python}", "studies/diagnose_features.py",
"--workdir={workdir}"])`.
"""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from sove_jax import checkpoint, sharding, state as state_lib
from sove_jax.evaluate import knn
from sove_jax.models import network


def norm(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def eff_rank(x):
  x = x - x.mean(0)
  s = np.linalg.svd(x, compute_uv=False)
  p = s / s.sum()
  return float(np.exp(-(p * np.log(p + 1e-12)).sum()))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--train", type=int, default=10000)
  p.add_argument("--test", type=int, default=2000)
  p.add_argument("--random", action="store_true", help="also the random initialisation")
  p.add_argument("--train_split", default="", help="memory split (default: the run's)")
  p.add_argument("--eval_split", default="", help="query split (default: the run's)")
  a = p.parse_args()

  from sove_jax.data import pipeline
  config = checkpoint.read_config(a.workdir)
  size = config.data.global_size
  abstract = state_lib.abstract(config)
  replicated = jax.NamedSharding(sharding.batch_mesh(), jax.P())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          abstract)
  ck = checkpoint.Checkpointer(a.workdir, read_only=True)
  try:
    st = ck.restore(abstract).state
  finally:
    ck.close()
  graphdef, _ = network.abstract_network(config.model, size, network.prototypes_of(config))
  nets = {"teacher": st.teacher, "student": st.student}
  if a.random:
    init = state_lib.init_for(config, size)(jax.random.PRNGKey(config.seed))
    nets["random"] = init.teacher

  def batches(split, n):
    return pipeline.eval_input(config.data, split=split, global_batch_size=500, max_examples=n)

  @jax.jit
  def feats(params, images):
    net = nnx.merge(graphdef, params)
    tokens, blocks = net.backbone(images, return_blocks=net.backbone.depth)
    emb, _ = net(images, patch_tokens=False)
    out = {"cls": tokens[:, 0], "meanpatch": tokens[:, 1:].mean(1),
           "cls+meanpatch": jnp.concatenate([tokens[:, 0], tokens[:, 1:].mean(1)], -1),
           "head": emb, "allpatch": tokens[:, 1:].reshape(tokens.shape[0], -1)}
    for i, b in enumerate(blocks):
      out[f"block{i + 1}_cls"] = b[:, 0]
    return out

  def collect(params, split, n):
    out, labels = {}, []
    for batch in batches(split, n):
      f = jax.device_get(feats(params, batch["image"]))
      valid = np.asarray(batch["valid"]) if "valid" in batch else slice(None)
      for k, v in f.items():
        out.setdefault(k, []).append(np.asarray(v)[valid])
      labels.append(np.asarray(batch["label"])[valid])
    return {k: np.concatenate(v) for k, v in out.items()}, np.concatenate(labels)

  rows = []
  print("| net | feature | dim | eff. rank | k-NN k=20 |")
  print("|---|---|---|---|---|")
  for name, params in nets.items():
    tr, ytr = collect(params, a.train_split or config.data.train_split, a.train)
    te, yte = collect(params, a.eval_split or config.data.eval_split, a.test)
    for k in tr:
      acc = knn.knn_classify(norm(tr[k]), ytr, norm(te[k]), yte, ks=(20,), temperature=0.07,
                             num_classes=10)[20]
      rows.append(dict(net=name, feature=k, dim=int(tr[k].shape[1]),
                       eff_rank=eff_rank(tr[k][:5000]), knn_k20=float(acc)))
      print(f"| {name} | {k} | {rows[-1]['dim']} | {rows[-1]['eff_rank']:.1f} | {acc:.2f} |",
            flush=True)
  (epath.Path(a.workdir) / "features.json").write_text(json.dumps(
      {"rows": rows, "train": a.train, "test": a.test,
       "splits": [a.train_split or config.data.train_split,
                  a.eval_split or config.data.eval_split]}, indent=1))


if __name__ == "__main__":
  main()
