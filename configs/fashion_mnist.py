r"""The reference run: the default recipe trained 12 times as long (25,920 steps of 64 images,
27.6 epochs): about an hour of training (61-63 minutes) on 2 quiet CPU cores (start-up and
compilation included, under tcmalloc), the teacher then above the raw pixels in k-NN and in the
linear probe.

    python -m sove_jax.main --config=configs/fashion_mnist.py --workdir=runs/fmnist
    python -m sove_jax.evaluate.knn --workdir=runs/fmnist
    python -m sove_jax.evaluate.linear --workdir=runs/fmnist --lrs=0.01,0.03,0.1,0.3,1,3,10

The recipe was chosen by a rule fixed before any result (studies/reference.py): the best of the
default and two 10-minute arms at 4x their steps on the validation k-NN (the default, with its KoLeo
term of 0.8). The length: first an hour's (8x, 48 minutes), because the scaling curve of the recipe
without KoLeo (studies/scaling.py) met the raw pixels' k-NN at about 7x; then, added after that run
and as the goal allows when an hour falls short of it, 12x: the hour's first seed beat the pixels
(test k-NN 85.54 against 85.16, linear probe 86.85 against 84.62) but not the goal's 86 and 87.
Nothing else changes: the warm-up keeps the default's 0.3 epochs, and the learning rate's and the
teacher EMA's cosines stretch over the whole run, as the study ran them.

Expected (whole Fashion-MNIST test split, teacher; seeds 0 and 1): k-NN top-1 (k = 20) on the
last [CLS] 86.81 and 86.46 (mean 86.64; [CLS] + mean patch 86.94 and 86.47, the last 4 blocks'
[CLS] 87.17 and 86.83), linear probe 88.04 and 88.28 (mean 88.16; rate chosen on the validation
split); on validation (memory train-minival, queries minival) k-NN 87.29 and 86.39. The raw pixels
give 85.16 and 84.62, the network at random initialization 67.5 and 75.5, the hour's run (8x,
seed 0) 85.54 and 86.85. Training took 63 and 61 minutes.

The k-NN monitor is off (it ran off in the study, so the wall time is the trainer's alone);
`--config.knn_every=2000` turns it on.
"""
from sove_jax import configuration

default = configuration.sibling("default", of=__file__)

STEPS = 12 * 2160   # 12 times the default's 10-minute length


def get_config():
  c = default.get_config()
  c.total_steps = STEPS
  c.knn_every = 0
  return c
