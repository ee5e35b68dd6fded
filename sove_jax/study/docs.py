r"""The readings in a markdown file regenerated from the studies' results.

    python -m sove_jax.study.docs docs/study.md

Every block of the file between a line `<!-- study: STUDY_FILE RESULTS_DIR -->` and the next
`<!-- end study -->` is replaced by that study's tables and readings (the claims with their
tests, the factorial's main effects, the dose-response, the study file's own `report` section)
from RESULTS_DIR/results.jsonl, its headings one level down. Text outside the blocks is left as it is; a study without results
yet gets a line saying so.
"""
from __future__ import annotations

import os
import re
import sys

from sove_jax.study import records as rec
from sove_jax.study import report
from sove_jax.study.spec import RESULTS, StudyError, load_study

BLOCK = re.compile(r"(<!-- study: (\S+) (\S+) -->\n)(.*?)(<!-- end study -->)", re.S)


def block(study_file: str, out: str, level: int = 3) -> str:
  """A study's tables and readings as markdown, its "## " headings at `level`."""
  study = load_study(study_file)
  records = rec.read_jsonl(os.path.join(out, RESULTS))
  if not records:
    return f"(no results yet in `{out}/{RESULTS}`)\n"
  by_run = rec.records_by_run(study, records)
  lines = report.tables(study, by_run) + report.readings(study, records)
  if study.extra_report is not None:
    lines += ["", study.extra_report(study, records, out).rstrip()]
  text = "\n".join(lines).strip() + "\n"
  return re.sub(r"^## ", "#" * level + " ", text, flags=re.M)


def regenerate(path: str) -> int:
  """Rewrites every study block of the file at `path`; returns how many there were."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  count = 0

  def replace(m):
    nonlocal count
    count += 1
    return m.group(1) + "\n" + block(m.group(2), m.group(3)) + "\n" + m.group(5)

  new = BLOCK.sub(replace, text)
  report.write_atomic(path, new)
  return count


def main(argv):
  if len(argv) != 2:
    sys.exit("usage: python -m sove_jax.study.docs FILE.md")
  try:
    n = regenerate(argv[1])
  except StudyError as e:
    sys.exit(f"Study error: {e}")
  print(f"{argv[1]}: {n} study block(s) regenerated")


if __name__ == "__main__":
  main(sys.argv)
