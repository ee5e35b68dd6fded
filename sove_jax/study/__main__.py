"""`python -m sove_jax.study --arms=STUDY_FILE --out=DIR`: see sove_jax.study."""
from sove_jax.study import cli

if __name__ == "__main__":
  cli.run()
