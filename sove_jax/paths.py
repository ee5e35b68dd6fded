"""Paths that may be local or in a bucket (gs://...), told apart in one place.

Why: workdirs, data and weight files live on a bucket on pods and on a local disk elsewhere.
Where a local path allows something a bucket does not (an `flock`, a memory map, making it
absolute) the code asks `is_local`; string joins keep a bucket URL's scheme intact, which
os.path.join would keep too but os.path.abspath would not.
"""
import os


def is_local(path) -> bool:
  """True for a file-system path, False for a URL with a scheme (gs://bucket/...)."""
  return "://" not in os.fspath(path)


def absolute(path: str) -> str:
  """A local path made absolute; a bucket URL kept as it is."""
  return os.path.abspath(path) if is_local(path) else path


def join(*parts: str) -> str:
  """`parts` joined by single slashes, for local paths and bucket URLs alike."""
  return "/".join([p.rstrip("/") for p in parts[:-1]] + [parts[-1]])
