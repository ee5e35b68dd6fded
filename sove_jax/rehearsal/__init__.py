"""The pod rehearsal: several processes on this machine, faults a pod meets, and a table.

`python -m sove_jax.rehearsal` (`pod.py`) trains configs/rehearsal.py as 4 processes x 2 fake CPU
devices on a synthetic ImageNet-shaped JPEG set, with the workdir in a fake bucket
(`fake_gcs.py`), and checks that SIGTERM and Ctrl-C on some hosts, a host killed outright, and the
restarts after them leave the run where an uninterrupted one ends, bit for bit.
"""
