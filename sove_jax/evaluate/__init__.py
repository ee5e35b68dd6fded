"""Evaluation of a trained run: one command per protocol, each reading a run's workdir.

Every evaluator starts from the teacher backbone of a checkpoint (`backbone.load_backbone`: the
network rebuilt from the run's config, the weights restored) and writes its result as JSON
beside the checkpoints:

- `knn`: weighted k-NN on frozen [CLS] features (DINO's protocol), k in {10, 20, 100, 200};
  `--lowshot` adds the 1% and 10% label subsets. -> knn.json
- `linear`: a linear probe on frozen features (SGD with a sweep of learning rates). -> linear.json
- `finetune`: end-to-end fine-tuning with a linear head (the BEiT/iBOT protocol: layer-wise
  learning-rate decay, drop-path, label smoothing, mixup/cutmix), from the checkpoint or, as the
  baseline, from a random initialization; 1% / 10% label subsets. -> finetune.json
- `retrieval`: revisited Oxford and Paris (mAP Easy / Medium / Hard, junk ignored) with [CLS]
  descriptors. -> retrieval_<dataset>.json
- `video`: DAVIS-2017 semi-supervised segmentation by label propagation between frames on patch
  features (DINO's protocol), scored by J&F. -> video.json
- `pca`: a PNG of the first three principal components of patch features over a set of images,
  as RGB. -> pca.png, pca.json

Shared parts: `features` (a split's features on the host, the common flags), `images` (image
files of any size through the backbone, for retrieval, video and the PCA pictures).

    python -m sove_jax.evaluate.<name> --workdir=DIR [flags]
"""
