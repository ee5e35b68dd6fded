"""Argument checks of the objective's functions: sizes static and in range, ranks as the layouts
say, one sentence naming the argument, raised while tracing."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


def check_int(name: str, value: Any, minimum: int) -> int:
  """Sizes must be static Python (or NumPy) ints: they fix array shapes at trace time."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be a Python int (a static size), got {value!r}")
  value = int(value)
  if value < minimum:
    raise ValueError(f"{name}={value} must be >= {minimum}")
  return value


def check_rank(name: str, x: Any, rank: int, layout: str) -> None:
  if jnp.ndim(x) != rank:
    raise ValueError(f"{name} must have rank {rank} {layout}, got shape {jnp.shape(x)}")


def check_masked_patch_inputs(student: tuple[str, Any], teacher: tuple[str, Any],
                              mask: Any) -> None:
  """The masked-patch losses' inputs (SOVE's here, iBOT's in prototypes.py): a student and a
  teacher array [V, B, L, K] of one shape, each given as (name, array), and `mask` [V, B, L]."""
  (student_name, s), (teacher_name, t) = student, teacher
  check_rank(student_name, s, 4, "[V, B, L, K]")
  check_rank(teacher_name, t, 4, "[V, B, L, K]")
  check_rank("mask", mask, 3, "[V, B, L]")
  if jnp.shape(t) != jnp.shape(s):
    raise ValueError(f"{teacher_name} has shape {jnp.shape(t)}, expected {jnp.shape(s)} "
                     f"({student_name})")
  if jnp.shape(mask) != jnp.shape(s)[:3]:
    raise ValueError(f"mask has shape {jnp.shape(mask)}, expected {jnp.shape(s)[:3]} "
                     f"({student_name} [V, B, L])")


def check_smoothing(smoothing: Any) -> None:
  if isinstance(smoothing, (int, float)) and not 0.0 <= smoothing <= 1.0:
    raise ValueError(f"smoothing={smoothing} must lie in [0, 1]")
