"""A study's report: `results.md` (one table per group, the searches, the claims and effects
with their tests) and `results.png` (bars with the spread), rewritten after every finished run.
"""
from __future__ import annotations

import dataclasses
import os
import textwrap
from typing import Sequence

from sove_jax.study import analysis
from sove_jax.study import records as rec
from sove_jax.study.spec import FAILURES, RESULTS, Arm, Study


def duration(seconds: float | None) -> str:
  if seconds is None:
    return "–"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def pm(mean_and_std, digits=2) -> str:
  mean, std = mean_and_std
  if mean is None:
    return "–"
  return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def write_atomic(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


@dataclasses.dataclass
class Summary:
  n: int
  metrics: dict          # stage -> (mean, std)
  steps: int | None
  images_per_sec: float | None
  train_seconds: float | None


def summarize(study: Study, records: Sequence[dict]) -> Summary:
  mean_of = lambda key: rec.mean_std([r[key] for r in records if r.get(key) is not None])[0]
  steps = [r["steps"] for r in records if r.get("steps") is not None]
  metrics = {s.name: rec.mean_std([rec.metric(study, r, s.name) for r in records])
             for s in study.stages[1:]}
  return Summary(n=len(records), metrics=metrics, steps=max(steps) if steps else None,
                 images_per_sec=mean_of("images_per_sec"), train_seconds=mean_of("train_seconds"))


def row_label(arm: Arm) -> str:
  """An arm's name in its table and chart: without its group's name when it starts with it
  ("Table 9: soft" in group "Table 9" is "soft"); names stay unique in the study."""
  prefix = arm.group + ": "
  return arm.name[len(prefix):] if arm.name.startswith(prefix) and arm.name != prefix else arm.name


def _settings(settings) -> str:
  return ", ".join(f"{n} {v:g}" for n, v in settings) or "defaults"


def table_rows(study: Study, by_run: dict) -> list[dict]:
  """One row per arm, in study order: its runs at the setting it reports, on the report seeds."""
  chosen = rec.report_runs(study, by_run)
  table = analysis.rows(study, by_run)
  rows = []
  for arm in study.arms:
    row = dict(arm=arm, group=arm.group, settings=None, note="")
    target = arm.same_as or arm.name
    if arm.search and target not in chosen:
      steps = rec.search_steps(study, arm, by_run)
      row["note"] = f"search running ({steps[-1].search.name}: {len(steps[-1].scores)}/" \
                    f"{len(steps[-1].values)} values scored)"
    elif arm.search:
      row["settings"] = chosen[target]
      row["note"] = "best of " + " x ".join(str(len(s.values)) for s in
                                          rec.search_steps(study, arm, by_run))
    row["summary"] = summarize(study, [r for _, r in sorted(table.get(arm.name, {}).items())])
    rows.append(row)
  return rows


def _header(study: Study) -> list[str]:
  budget = " ".join(f"`{o}`" for o in study.overrides) or "(the base config's)"
  seeds = ", ".join(map(str, study.seeds))
  budget = (f"at the same budget: {budget}" if study.same_budget else
            f"and the common overrides {budget}; arms may set their own length (steps)")
  lines = [
      f"# {study.name}", "",
      f"Every arm trains `python -m sove_jax.main --config={study.config}` with its overrides "
      f"{budget}. Seeds {seeds} (the seed sets the initialization and the data "
      "order). Values are the mean ± sample standard deviation (n - 1) over the seeds finished "
      "(column n).", "", "Protocol of a run:"]
  for s in study.stages:
    what = {"train": "training", "knn": "`python -m sove_jax.evaluate.knn`",
            "linear": "`python -m sove_jax.evaluate.linear`"}.get(
                s.kind, f"`{' '.join(s.command)}`")
    flags = " ".join(s.args) + (f" --lrs=(best of {s.lrs_from})" if s.lrs_from else "")
    runs = {"all": "", "search": " (search runs)", "report": " (reported runs)"}[s.runs]
    runs += f" (arms {', '.join(s.arms)} only)" if s.arms else ""
    lines.append(f"- {s.name}: {what}" + (f" `{flags.strip()}`" if flags.strip() else "") + runs
                 + (f"; the table shows {s.metric_path}" if s.metric_path else ""))
  flags = [f"k-NN `{' '.join(study.knn_args)}`" if study.knn_args else "",
           f"linear `{' '.join(study.linear_args)}`" if study.linear_args else ""]
  if any(flags):
    lines += ["", "Evaluator flags: " + "; ".join(f for f in flags if f) + "."]
  if study.notes:
    lines += ["", study.notes.strip()]
  if any(a.search for a in study.arms):
    lines += ["", f"Searches choose each value by the mean {study.select} over seed(s) "
              f"{', '.join(map(str, study.search_seeds))}; every value is listed under "
              "\"Searches\"."]
  return lines


def tables(study: Study, by_run: dict) -> list[str]:
  """One markdown table per group: each arm's row at the setting it reports."""
  rows = table_rows(study, by_run)
  shown = study.report_stages
  lines = []
  for group in dict.fromkeys(r["group"] for r in rows):
    group_rows = [r for r in rows if r["group"] == group]
    searched = any(r["arm"].search for r in group_rows)
    paper = [(label, key) for label, key in (("Paper k-NN", "paper_knn"),
                                             ("Paper linear", "paper_linear"))
             if any(getattr(r["arm"], key) is not None for r in group_rows)]
    head = ["Arm"] + (["chosen"] if searched else []) + ["n"] + [s.title for s in shown] + [
        label for label, _ in paper] + ["Steps", "img/s", "Train time"]
    lines += ["", f"## {group}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in group_rows:
      s, arm = r["summary"], r["arm"]
      cells = [row_label(arm) + (f" (= {arm.same_as})" if arm.same_as else "")]
      if searched:
        cells.append("–" if not arm.search else r["note"] if r["settings"] is None else
                     f"{_settings(r['settings'])} ({r['note']})")
      own = arm.seeds or study.seeds
      n_seeds = len(set(own) | set(study.more_seeds) if s.n > len(own) else own)
      cells += [f"{s.n}/{n_seeds}"] + [pm(s.metrics[st.name]) for st in shown]
      cells += ["–" if getattr(arm, key) is None else f"{getattr(arm, key):.1f}"
                for _, key in paper]
      cells += ["–" if s.steps is None else str(s.steps),
                "–" if s.images_per_sec is None else f"{s.images_per_sec:,.0f}",
                duration(s.train_seconds)]
      lines.append("| " + " | ".join(cells) + " |")
  return lines


def markdown(study: Study, records: Sequence[dict], failures: Sequence[dict] = (),
             out: str | None = None) -> str:
  """results.md: the tables, the searches, the readings, the arms, the failed runs, and the
  study file's own section (`report(study, records, out)`)."""
  by_run = rec.records_by_run(study, records)
  lines = _header(study) + tables(study, by_run) + _searches(study, by_run)
  lines += readings(study, records)
  lines += ["", "## Arms", ""]
  for arm in study.arms:
    if arm.same_as:
      lines.append(f"- {arm.name} ({arm.group}): the runs of {arm.same_as} (the same config)")
      continue
    overrides = " ".join(f"`{o}`" for o in arm.overrides) or "(none)"
    search = "".join(f"; {s.name} ({', '.join(s.fields)}) searched over "
                     f"{', '.join(f'{v:g}' for v in s.values)}" for s in arm.search)
    lines.append(f"- {arm.name} ({arm.group}): {overrides}{search}")
  if failures:
    lines += ["", "## Failed runs (rerun the study to retry them)", ""]
    for f in failures:
      lines.append(f"- {f['label']}, seed {f['seed']}: {f['stage']} failed: {f['error']}")
  if study.extra_report is not None:
    lines += ["", study.extra_report(study, records, out).rstrip()]
  return "\n".join(lines) + "\n"


def _searches(study: Study, by_run: dict) -> list[str]:
  arms = [a for a in study.arms if a.search]
  if not arms:
    return []
  lines = ["", "## Searches"]
  for arm in arms:
    lines += ["", f"### {arm.name}"]
    for step in rec.search_steps(study, arm, by_run):
      fixed = f" at {_settings(step.fixed)}" if step.fixed else ""
      lines += ["", f"{step.search.name} ({', '.join(step.search.fields)}){fixed}:", "",
                f"| {step.search.name} | n | {study.select} | |", "|---|---|---|---|"]
      for v in step.values:
        runs = by_run.get(rec.run_key(arm.name, step.settings(v)), {})
        got = [rec.metric(study, runs[s], study.select) for s in study.search_seeds if s in runs]
        got = [g for g in got if g is not None]
        mark = "best" if v == step.best else ""
        default = " (config's)" if v == step.search.default else ""
        lines.append(f"| {v:g}{default} | {len(got)} | {pm(rec.mean_std(got))} | {mark} |")
  return lines


def _p(p: float) -> str:
  return "< 0.001" if p < 0.001 else f"{p:.3f}"


def readings(study: Study, records: Sequence[dict]) -> list[str]:
  """The claims, factorial effects and dose-response of the study, each with its test."""
  by_run = rec.records_by_run(study, records)
  table = analysis.rows(study, by_run)
  lines = []
  verdicts = analysis.claims(study, table) if study.claims else []
  if verdicts:
    lines += ["", "## Claims", "",
              "| claim | metric | n | difference | 95% interval | p | Holm p | Welch p | paper "
              "| reading |", "|---|---|---|---|---|---|---|---|---|---|"]
    arms = {a.name: a for a in study.arms}
    for v in verdicts:
      t = v["test"]
      v["better"], v["worse"] = row_label(arms[v["better"]]), row_label(arms[v["worse"]])
      paper = "–" if v["paper"] is None else f"{v['paper']:+.1f}"
      if t is None:
        lines.append(f"| {v['better']} > {v['worse']} | {v['metric']} | {v['n'][0]}, {v['n'][1]} "
                     f"| – | – | – | – | – | {paper} | not enough runs |")
        continue
      welch = _p(v["welch"]["p"]) if "welch" in v else "–"
      lines.append(f"| {v['better']} > {v['worse']} | {v['metric']} | {v['n'][0]}, {v['n'][1]} | "
                   f"{t['diff']:+.2f} | {t['ci'][0]:+.2f} to {t['ci'][1]:+.2f} | {_p(t['p'])} | "
                   f"{_p(v['holm_p'])} | {welch} | {paper} | **{v['reading']}** |")
    for metric in dict.fromkeys(v["metric"] for v in verdicts if v["test"] is not None):
      v = next(v for v in verdicts if v["metric"] == metric and v["test"] is not None)
      lines += ["", f"{metric}: within-row sd {v['sd'][0]:.2f} pooled over the table's rows "
                f"({v['sd'][1]} degrees of freedom); with {v['n'][0]} and {v['n'][1]} seeds a "
                f"difference of {v['detectable']:.2f} points is detected with 80% power "
                "(two-sided t-test, level 0.05). A claim is decided when its Holm-corrected p is "
                "below 0.05 (the family: this metric's claims)."]
  for metric in dict.fromkeys([analysis.default_metric(study)] +
                              [s.name for s in study.report_stages]):
    fit = analysis.factorial(study, table, metric) if study.factors else None
    if fit is not None:
      lines += _factorial(study, fit, metric)
    dose = analysis.dose(study, table, metric)
    if dose is not None:
      lines += _dose(study, dose, metric)
  return lines


def _factorial(study: Study, fit: dict, metric: str) -> list[str]:
  letters = fit["letters"]
  lines = ["", f"## Main effects ({metric})", "",
           f"{fit['runs']} runs at {fit['points']} design points (resolution "
           f"{fit['resolution']}); error sd {fit['sd']:.2f} from {fit['error']} error "
           f"({fit['df']} degrees of freedom): an effect of {fit['detectable']:.2f} points is "
           "detected with 80% power.", "",
           "| factor | low → high | effect | 95% interval | p | Holm p | paper | aliased with |",
           "|---|---|---|---|---|---|---|---|"]
  for f in study.factors:
    e = fit["effects"][f["name"]]
    paper = "–" if f.get("paper") is None else f"{f['paper']:+.1f}"
    lines.append(f"| {f['name']} ({letters[f['name']]}) | {f.get('low', '-')} → "
                 f"{f.get('high', '+')} | {e['effect']:+.2f} | {e['ci'][0]:+.2f} to "
                 f"{e['ci'][1]:+.2f} | {_p(e['p'])} | {_p(e['holm_p'])} | {paper} | "
                 f"{', '.join(e['aliases']) or 'nothing up to 3 factors'} |")
  return lines


def _dose(study: Study, fit: dict, metric: str) -> list[str]:
  name = study.dose.get("name", "dose")
  per = "per doubling of " + name if fit["log2"] else f"per unit of {name}"
  lines = ["", f"## Dose-response of {name} ({metric})", "", f"| {name} | n | {metric} |",
           "|---|---|---|"]
  for level, vs in fit["levels"].items():
    lines.append(f"| {level:g} | {len(vs)} | {pm(rec.mean_std(vs))} |")
  paper = study.dose.get("paper")
  lines += ["", f"Slope {fit['slope']:+.3f} {per} (95% interval {fit['ci'][0]:+.3f} to "
            f"{fit['ci'][1]:+.3f}, p {_p(fit['p'])}, {fit['runs']} runs); a slope of "
            f"{fit['detectable']:.3f} is detected with 80% power."
            + (f" Paper: {paper}." if paper else "")]
  return lines


def chart(study: Study, records: Sequence[dict], path: str) -> bool:
  """Bars of the report stages' figures per arm (mean, error bar: std over seeds), one panel per
  group. Returns False when matplotlib is missing (the markdown holds the same numbers)."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  rows = table_rows(study, rec.records_by_run(study, records))
  shown = study.report_stages[:3]
  groups = list(dict.fromkeys(r["group"] for r in rows))
  width = max(6.0, 1.3 * max(sum(r["group"] == g for r in rows) for g in groups) + 2)
  fig, axes = plt.subplots(len(groups), 1, figsize=(width, 3.6 * len(groups)), squeeze=False)
  bar = 0.76 / max(1, len(shown))
  for ax, group in zip(axes[:, 0], groups):
    group_rows = [r for r in rows if r["group"] == group]
    xs = list(range(len(group_rows)))
    for offset, (stage, color) in enumerate(zip(shown, ("tab:blue", "tab:orange", "tab:green"))):
      means = [r["summary"].metrics[stage.name][0] for r in group_rows]
      stds = [r["summary"].metrics[stage.name][1] or 0.0 for r in group_rows]
      pos = [x + (offset - (len(shown) - 1) / 2) * bar for x in xs]
      ax.bar(pos, [m if m is not None else 0.0 for m in means], bar * 0.95, yerr=stds,
             capsize=3, color=color, label=stage.title)
      for p, m, sd in zip(pos, means, stds):
        if m is not None:
          ax.text(p, m + sd + 0.3, f"{m:.1f}", ha="center", va="bottom", fontsize=7)
    names = [row_label(r["arm"]) + ("" if not r["settings"] else "\n" + _settings(r["settings"]))
             + f"\nn={r['summary'].n}" for r in group_rows]
    ax.set_xticks(xs, names, fontsize=8)
    present = [(m, sd or 0.0) for r in group_rows for m, sd in r["summary"].metrics.values()
               if m is not None]
    if present:
      low = min(m - sd for m, sd in present)
      high = max(m + sd for m, sd in present)
      ax.set_ylim(max(0.0, low - 10.0), min(105.0, high + 0.25 * (high - low) + 6.0))
    ax.set_ylabel("top-1 (%)")
    ax.set_title(textwrap.fill(f"{study.name}: {group} (mean ± std over seeds)",
                               width=int(width * 12)), fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=len(shown), frameon=False)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def write_report(study: Study, out: str, *, chart_too: bool = True) -> None:
  """Rewrites OUT/results.md (and, with `chart_too`, OUT/results.png) from the records."""
  records = rec.read_jsonl(os.path.join(out, RESULTS))
  done = {(rec.run_key(r["arm"], rec.settings_of(r)), r["seed"]) for r in records}
  latest = {}
  for f in rec.read_jsonl(os.path.join(out, FAILURES)):
    key = (rec.run_key(f["arm"], rec.settings_of(f)), f["seed"])
    if key not in done:
      latest[key] = f
  write_atomic(os.path.join(out, "results.md"),
               markdown(study, records, list(latest.values()), out))
  if chart_too:
    chart(study, records, os.path.join(out, "results.png"))
