"""Evaluation of a trained backbone: one command per protocol, on one spine (`protocol.run`).

Every command evaluates the teacher backbone of a training run's checkpoint (`--workdir`) or
released PyTorch weights (`--weights=FILE --arch=vit_small`), prints a table and writes
`<name>.json` (the checkpoint step or weights file, and the protocol that ran):

- `knn`: weighted k-NN on frozen [CLS] features (DINO's protocol), k in {10, 20, 100, 200};
  `--lowshot` adds 1% and 10% of the labels (SimCLRv2's split files, or random subsets).
- `linear`: a linear probe on frozen features, the rate chosen on a validation split;
  `--protocol=paper` DINO's augmented probe, `fast` precomputed features.
- `finetune`: end-to-end fine-tuning, BEiT's recipe on all labels, iBOT's semi-supervised one
  on a label split.
- `retrieval`: revisited Oxford and Paris (mAP Easy / Medium / Hard), the authors' protocol.
- `video`: DAVIS-2017 label propagation on patch features (DINO's protocol), J&F.
- `pca`: a PNG of the first three principal components of patch features.

Shared parts: `protocol` (the spine: flags, loading, baselines, records), `backbone` (a run's
backbone), `features` (frozen features of a split), `splits` (datasets, validation splits, label
subsets), `images` (image files of any size through the backbone), `classifier` (fine-tuning's
model and step). docs/evaluation.md lists each protocol against the paper's.

    python -m sove_jax.evaluate.<name> --workdir=DIR [flags]
"""
