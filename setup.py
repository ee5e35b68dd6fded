"""sove_jax: SOVE (Self-Organizing Visual Embeddings) self-supervised ViT pretraining in JAX."""
from setuptools import find_packages, setup

setup(
    name="sove_jax",
    version="0.1.0",
    description="Non-parametric self-supervised ViT pretraining (SOVE) in JAX/Flax, TPU first.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sove_jax", "sove_jax.*"]),
    python_requires=">=3.11,<3.14",
    install_requires=[
        "jax>=0.7.2,<0.11",
        "flax>=0.11.2,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11.20,<0.13",
        "chex>=0.1.90,<0.2",
        "ml-collections>=1.0,<2",
        "absl-py>=2.1",
        "numpy>=1.26",
        # Metric writers and periodic actions (progress, profiling); paths local or on buckets.
        "clu>=0.0.12",
        "etils[epath]>=1.7",
        # Orbax asks a gs:// bucket for its namespace layout before listing checkpoints.
        "google-cloud-storage>=2.18",
        # What `tensorboard --logdir WORKDIR` needs, and CLU's writer reads its hparams API.
        "tensorboard>=2.18,<2.22",
        "safetensors>=0.4",
        # tf.data only (host side); the CPU build so TensorFlow never claims an accelerator.
        "tensorflow-cpu>=2.18,<2.22; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "tensorflow>=2.18,<2.22; platform_system != 'Linux' or platform_machine != 'x86_64'",
        "tensorflow-datasets>=4.9.7,<5",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist"],  # xdist: the suite on every core
        # PyTorch weight export/import (.pth) and the parity test.
        "torch": ["torch>=2.4"],
        # The learning-curve figure in the README.
        "plot": ["matplotlib>=3.8"],
    },
)
