"""``python -m fusion.study <sweep>`` and the Hydra callback that runs it when a multirun ends.

:func:`write_study` reads every job of the sweep (:mod:`fusion.study.jobs`), and per group (task, and the
VE-dropout / fusion / head values when they vary) writes the subset table (:mod:`fusion.study.aggregate`);
then, with ``leaning``, analyses the group's all-encoder jobs on their best checkpoints (attention and
``encoder_ablation``: :mod:`fusion.study.leaning`), and from those the retrain-vs-mask agreement
(:mod:`fusion.study.agreement`) and the utilisation measures with every job's effective rank
(:mod:`fusion.study.utilisation`); last the paper-style ``study.md`` and ``summary.json``
(:mod:`fusion.study.report`), and a wandb run when the jobs logged to wandb.

A sweep with one group writes the group's files into the sweep folder itself; several groups get one
folder each (``<sweep>/<group>/``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fusion.io import write_json, write_text
from fusion.study.aggregate import summarize, write_table
from fusion.study.agreement import agreement
from fusion.study.common import write_csv
from fusion.study.jobs import KEYS, collect, group_jobs, retrained_reference
from fusion.study.leaning import analyse_full_jobs, write_leaning
from fusion.study.report import agreement_rows, log_wandb, paper_rows, scatter, study_markdown, utilisation_rows
from fusion.study.utilisation import job_effective_ranks, utilisation

__all__ = ["StudyCallback", "SubsetTable", "main", "write_study"]


def _folder_name(group: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,+-]", "_", group)


def _used_wandb(sweep_dir: Path, rows: list[dict[str, Any]]) -> bool:
    """Whether any job logged to wandb (a WandbLogger in its resolved config)."""
    for r in rows:
        config = OmegaConf.load(sweep_dir / r["job"] / "config_resolved.yaml")
        loggers = config.get("logger") or {}
        if any("Wandb" in str(OmegaConf.select(loggers, f"{k}._target_", default="")) for k in loggers):
            return True
    return False


def write_study(sweep_dir: str | Path, metric: str = "test/acc", leaning: bool = True, effective_rank: bool = True,
                max_examples: int = 256, wandb: bool | None = None) -> dict[str, Any]:
    """Write the study of the sweep into ``sweep_dir`` (see the module); returns what summary.json holds.

    ``leaning``: the analyses of the all-encoder jobs (leaning, agreement, masked utilisation); without it
    only the tables. ``effective_rank``: every job's effective ranks on ``max_examples`` examples.
    ``wandb``: log the report as a wandb run (None: when the jobs used a wandb logger).
    """
    sweep_dir = Path(sweep_dir).resolve()  # the analyses run in the folder each job ran in
    rows = collect(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"study: no <job>/metrics.json below {str(sweep_dir)!r}; did every job fail?")
    groups = group_jobs(rows)
    stage = metric.partition("/")[0]
    folders = {g: "." if len(groups) == 1 else _folder_name(g) for g in groups}
    tables, summaries, images = {}, {}, {}
    for g, g_rows in groups.items():
        folder = sweep_dir / folders[g]
        folder.mkdir(exist_ok=True)
        summary = {"group": g, **{k: g_rows[0][k] for k in ("task", "ve_dropout", "fusion", "head")},
                   **summarize(g_rows, metric)}
        tables[g] = write_table(folder, g_rows, metric, summary)
        images[f"{g}/subsets"] = folder / "subsets.png"
        summaries[g] = summary
        write_json(folder / "summary.json", summary)
    # The tables are on disk before the analyses: they take longer, and a failing one must not lose them.
    if leaning:
        for g, g_rows in groups.items():
            folder, summary = sweep_dir / folders[g], summaries[g]
            analysed = analyse_full_jobs(sweep_dir, g_rows, summary["all"]["subset"], stage)
            summary["leaning"] = write_leaning(folder, analysed)
            # A group that trained only the all-encoder model (another VE-dropout value) is compared with
            # the retrained subsets of its task's fullest group.
            retrained_rows, reference = retrained_reference(groups, g)
            summary["agreement"] = agreement(retrained_rows, analysed, metric)
            if reference is not None and "skipped" not in summary["agreement"]:
                summary["agreement"]["retrained_from"] = reference
            if "skipped" not in summary["agreement"]:
                scatter(summary["agreement"], folder / "retrain_vs_mask.png", g)
                images[f"{g}/retrain_vs_mask"] = folder / "retrain_vs_mask.png"
                write_csv(folder / "agreement.csv", summary["agreement"]["points"], ["subset", "size", "seed"])
            if "skipped" not in summary["leaning"]:
                images[f"{g}/leaning_heatmap"] = folder / "leaning_heatmap.png"
            ranks = {}
            if effective_rank:
                ranks = {r["job"]: job_effective_ranks(sweep_dir / r["job"], stage, max_examples) for r in g_rows}
                write_csv(folder / "effective_rank.csv",
                          [{"job": j, "subset": r["subset"], "seed": r["seed"], "examples": v["examples"],
                            **{f"{kind}:{e}": x for kind in ("features", "projected") for e, x in v[kind].items()}}
                           for j, v in ranks.items() for r in g_rows if r["job"] == j], ["job", "subset", "seed"])
            summary["utilisation"] = utilisation(retrained_rows, analysed, metric, ranks)
            if reference is not None:
                summary["utilisation"]["retrained_from"] = reference
            summary["effective_rank"] = ranks
            columns, util_rows = utilisation_rows(summary["utilisation"])
            write_csv(folder / "utilisation.csv", [dict(zip(columns, r, strict=True)) for r in util_rows], columns)
            write_json(folder / "summary.json", summary)
    write_csv(sweep_dir / "jobs.csv", rows, list(KEYS))
    write_text(sweep_dir / "study.md", study_markdown(metric, tables, summaries, folders))
    top: dict[str, Any] = {"metric": metric, "groups": summaries, "folders": folders}
    if len(groups) == 1:
        top.update(next(iter(summaries.values())))  # one group: its summary at the top, as before the groups
    write_json(sweep_dir / "summary.json", top)
    print((sweep_dir / "study.md").read_text())
    if wandb if wandb is not None else _used_wandb(sweep_dir, rows):
        wandb_tables = {"subsets_by_group": paper_rows(tables, metric)}
        agreements = {g: s["agreement"] for g, s in summaries.items() if "agreement" in s}
        if agreements:
            wandb_tables["agreement"] = agreement_rows(agreements)
        for g, s in summaries.items():
            if s.get("utilisation"):
                wandb_tables[f"{g}/utilisation"] = utilisation_rows(s["utilisation"])
        top["wandb_run"] = str(log_wandb(sweep_dir, wandb_tables, images))
        write_json(sweep_dir / "summary.json", top)
    return top


class StudyCallback(Callback):
    """Hydra callback: :func:`write_study` on the sweep folder when the multirun ends."""

    def __init__(self, metric: str = "test/acc", leaning: bool = True, effective_rank: bool = True,
                 max_examples: int = 256) -> None:
        self.metric, self.leaning = metric, leaning
        self.effective_rank, self.max_examples = effective_rank, max_examples

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_study(config.hydra.sweep.dir, self.metric, leaning=self.leaning, effective_rank=self.effective_rank,
                    max_examples=self.max_examples)


# The name the zoo's configs used before the study moved out of fusion.zoo.
SubsetTable = StudyCallback


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fusion.study",
                                     description="The encoder-subset study of a sweep: subset tables per task, "
                                     "retrain vs mask agreement, utilisation, leaning, study.md and summary.json.")
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder (logs/train/multiruns/<time>)")
    parser.add_argument("--metric", default="test/acc")
    parser.add_argument("--no-leaning", dest="leaning", action="store_false",
                        help="only the tables: no analyses of the all-encoder jobs (leaning, masking, agreement)")
    parser.add_argument("--no-effective-rank", dest="effective_rank", action="store_false")
    parser.add_argument("--max-examples", type=int, default=256, help="examples per job for the effective rank")
    parser.add_argument("--wandb", dest="wandb", action="store_true", default=None,
                        help="log a wandb run (default: when the jobs used a wandb logger)")
    parser.add_argument("--no-wandb", dest="wandb", action="store_false")
    args = parser.parse_args(argv)
    write_study(args.sweep_dir, args.metric, leaning=args.leaning, effective_rank=args.effective_rank,
                max_examples=args.max_examples, wandb=args.wandb)
