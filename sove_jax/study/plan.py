"""The plan of a study: every run x seed it needs now, a pure function of the study and its
records, so a resumed study plans the same runs.
"""
from __future__ import annotations

import dataclasses

from sove_jax.study import analysis
from sove_jax.study.records import report_runs, run_key, search_steps
from sove_jax.study.spec import Run, Study


@dataclasses.dataclass(frozen=True)
class Planned:
  run: Run
  seed: int
  roles: frozenset        # {"search", "report"}: which stages it needs

  def stages(self, study: Study) -> tuple[str, ...]:
    return tuple(s.name for s in study.stages
                 if (s.runs == "all" or s.runs in self.roles)
                 and (not s.arms or self.run.arm.name in s.arms))


def planned_runs(study: Study, by_run: dict) -> list[Planned]:
  """Every (run, seed) the study needs now, seed-major (all arms at the first seed, then the
  next...), so partial results already compare every arm: each search's candidates on the
  search seeds, each arm's chosen setting on the report seeds, and, once every claim's arms
  are done at the report seeds, the extra seeds for the arms of undecided claims."""
  steps = {a.name: search_steps(study, a, by_run) for a in study.arms if a.search}
  rows = report_runs(study, by_run)
  extra = _undecided_arms(study, by_run) if study.more_seeds else set()
  order = list(dict.fromkeys((*study.search_seeds, *study.seeds, *study.more_seeds)))
  plan: dict[tuple, Planned] = {}

  def add(run, seed, role):
    key = (run_key(run.arm.name, run.settings), seed)
    roles = plan[key].roles | {role} if key in plan else frozenset({role})
    plan[key] = Planned(run, seed, roles)

  for seed in order:
    for arm in study.arms:
      if arm.same_as:
        continue
      if seed in study.search_seeds:
        for step in steps.get(arm.name, ()):
          for v in step.values:
            add(Run(arm, step.settings(v)), seed, "search")
      wanted = (seed in (arm.seeds or study.seeds)
                or (seed in study.more_seeds and arm.name in extra))
      if wanted and arm.name in rows:
        add(Run(arm, rows[arm.name]), seed, "report")
  return list(plan.values())


def _undecided_arms(study: Study, by_run: dict) -> set[str]:
  """The arms of claims that the report seeds leave undecided (Holm-corrected tests); none
  until every claim's arms are done at every report seed."""
  table = analysis.rows(study, by_run, seeds=study.seeds)
  involved = {c[k] for c in study.claims for k in ("better", "worse")}
  if any(len(table.get(n, {})) < len(study.seeds) for n in involved):
    return set()
  out = set()
  for verdict in analysis.claims(study, table):
    if not verdict["decided"]:
      out |= {verdict["better"], verdict["worse"]}
  return out
