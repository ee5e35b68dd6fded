"""`python -m sove_jax.rehearsal`: the pod rehearsal (pod.py)."""
from absl import app

from sove_jax.rehearsal import pod

app.run(pod.main)
