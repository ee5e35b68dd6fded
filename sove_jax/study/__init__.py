r"""Studies at equal budget: arms x seeds, each trained, evaluated, tabulated and tested.

    python -m sove_jax.study --arms=studies/table7.py --seeds=0,1,2 --out=runs/table7

A study is a list of arms, each a name and a set of config overrides in the command line's
syntax (`--config.sove.num_neighbors=3`), run for every seed at the same budget: the study's
common overrides fix the length, the batch and the base config for every arm, and an arm may not
change them. Each arm x seed is trained by `python -m sove_jax.main` in its own process, in
`OUT/<arm>/seed<N>` (`OUT/<arm>/lr<rate>/seed<N>` for a searched learning rate), then put
through the study's protocol stages; the seed sets the initialization and the data order, so
at one seed every arm sees the same images.

Modules: `spec` (the study file's definition, validated), `records` (results, searches),
`plan` (the runs a study needs now), `runner` (commands and stages, resumable), `report`
(results.md, results.png), `analysis` and `stats` (the tests every reading rests on), `cli` (the flags), `docs` (the
readings in docs/study.md regenerated).

The runner never imports TensorFlow or the trainer. It is resumable: each finished arm x seed is
one line of `OUT/results.jsonl` and is skipped when the study runs again; a killed training run
resumes from its last checkpoint, a finished stage is not repeated (`study.json` in the
workdir remembers). After every finished run it rewrites `OUT/results.md` and `OUT/results.png`.

The study file is Python (a module-level `STUDY`, or `get_study()` / `get_study(config)`
returning it, and optionally `report(study, records) -> markdown` for a section of its own) or
JSON:

    STUDY = dict(
        config="configs/default.py",            # base config of every arm
        overrides=["--config.total_steps=749"],  # the budget, common to every arm
        seeds=[1, 2, 3],                         # the seeds the tables report
        search_seeds=[0],       # the seeds a search tries every value on (or sweep_seeds=N:
                                # the first N of `seeds`, whose best runs then count too)
        more_seeds=[4, 5],      # run for both arms of a claim the seeds leave undecided
        stages=[                # the protocol of a run (default: train, knn, linear)
            "train",
            dict(name="knn_val", kind="knn", runs="search",
                 args=["--train_split=train-minival", "--eval_split=minival"]),
            dict(name="knn", kind="knn", runs="report"),
            dict(name="linear_val", kind="linear", runs="report",
                 args=["--train_split=train-minival", "--eval_split=minival"]),
            dict(name="linear", kind="linear", runs="report", lrs_from="linear_val"),
        ],
        select="knn_val",       # the stage whose figure chooses a search's value
        knn_args=[], linear_args=["--epochs=100"],   # extra flags of every k-NN / linear stage
        claims=[dict(better="SOVE", worse="iBOT", paper=0.9)],   # tested, Holm-corrected
        notes="...",            # markdown printed under the report's first paragraph
        arms=[
            dict(name="SOVE", group="Table 7", overrides={"method": "sove"},
                 search=[dict(name="lr", fields=["optim.base_lr"], values=[1e-3, 2e-3, 4e-3],
                              factor=2),
                         dict(name="tt", fields=["sove.teacher_temp"], values=[0.03, 0.04,
                              0.055], default=0.04)],
                 paper=dict(knn=70.0, linear=74.3)),   # the published figures, for the report
            dict(name="SOVE [CLS] only", group="Table 7", base_lrs=[1e-3, 2e-3]),
        ],
    )

`overrides` is a list of `--config.FIELD=VALUE` strings or a dict {FIELD: value}
(`configuration.override` writes them). A search tries each value of its fields on the search
seeds with the earlier searches' winners fixed, and keeps the best by the `select` stage (ties:
the smaller value); `factor` extends it at an edge until the best is interior; `default` is the
config's own value (a run at it is the earlier search's run). `base_lrs` (an arm's, or the
study's for arms without their own) is the one-search shorthand `lr` over `optim.base_lr`. A
table row reports the chosen setting on the report seeds. A stage's `runs` says which runs it
evaluates (the search's candidates, the reported runs, or all); a finished run that lacks a
stage the study lists has that stage run on its workdir (never trained again). An arm with
`same_as=NAME` is a row that reports the runs of arm NAME. A factorial study gives `factors`
(names, level labels, the paper's effect), `generators` ("F=J*T*K") and each arm's `levels`
({factor: -1 or +1}); a dose-response study gives `dose` ({"name", "scale": "log2"}) and each
arm's `dose`. The report then holds the main effects and the slope with their tests
(`analysis`).

A Python study file's `get_study(config)` gets the base config's path when `--config` names one
(else None), so a study can derive its arms' values from that config. `--only=NAME,...` runs
(and reports) the arms so named, or every arm of the groups so named; `--knn_args` and
`--linear_args` add evaluator flags (e.g. subsets of the splits for a quick check of a whole
study; docs/study.md).
"""
from sove_jax.study.plan import planned_runs
from sove_jax.study.records import (best_rate, chosen, mean_std, metric, read_jsonl,
                                    records_by_run, search_steps)
from sove_jax.study.report import markdown, write_report
from sove_jax.study.runner import Commands, Runner, run_study
from sove_jax.study.spec import (RESULTS, Arm, Run, Search, Stage, Study, StudyError,
                                 load_study, make_study, normalize_overrides)

__all__ = ["Arm", "Commands", "RESULTS", "Run", "Runner", "Search", "Stage", "Study",
           "StudyError", "best_rate", "chosen", "load_study", "make_study", "markdown",
           "mean_std", "metric", "normalize_overrides", "planned_runs", "read_jsonl",
           "records_by_run", "run_study", "search_steps", "write_report"]
