"""What ``train.py`` runs for a config with a ``zoo`` key: pretraining recipes, or a task on zoo weights.

- ``zoo.recipe`` non-empty (``+experiment=zoo/clip_tiny``, ``zoo/all``...): train each chosen recipe, save
  its tower to ``zoo.recipe.<name>.output`` and, with ``zoo.report``, probe every tower found in
  ``zoo.out_dir`` (trained vs random init) and write ``report.json`` there.
- else ``zoo.weights`` (``+experiment=zoo/complementarity``): give each chosen encoder its zoo weights
  file, then train the task as ``fusion.run.commands.train`` always does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from fusion.encoders.vision import TimmEncoder
from fusion.io import write_json
from fusion.run.commands import train as train_task
from fusion.run.context import RunContext, open_run
from fusion.zoo.probe import probe_encoders
from fusion.zoo.recipe import SaveEncoder, ZooRecipe

__all__ = ["pretrain", "report", "run", "use_zoo_weights"]


def run(cfg: DictConfig) -> dict[str, float]:
    """Dispatch on ``cfg.zoo`` (see the module docstring); returns flat metrics."""
    zoo = cfg.zoo
    # Intra-op threads: these models are tiny, and on a shared CPU several spinning OpenMP threads per
    # process made steps 10-70x slower than one thread (measured on the 2-core development machine).
    if zoo.get("num_threads"):
        torch.set_num_threads(int(zoo.num_threads))
    recipes = zoo.get("recipe") or {}
    if recipes:
        # No record: a zoo run folder holds towers and their logs, and may be run into again with other recipes.
        with open_run(cfg, "zoo", record=False) as run:
            metrics: dict[str, float] = {}
            for name in recipes:
                metrics.update({f"{name}/{k}": v for k, v in pretrain(run, name).items()})
            if zoo.get("report"):
                report(cfg)
            return run.finish(metrics)
    if zoo.get("weights"):
        use_zoo_weights(cfg)
        return train_task(cfg)
    raise ValueError(
        "zoo: nothing to do; choose recipes (+experiment=zoo/all or zoo/<name>) or give zoo.weights "
        "(+experiment=zoo/complementarity)"
    )


def pretrain(run: RunContext, name: str) -> dict[str, float]:
    """Train recipe ``cfg.zoo.recipe.<name>`` of ``run`` and save its tower; returns its last logged metrics.
    Its loggers save into ``<run folder>/<name>``: one wandb run per recipe."""
    cfg = run.cfg
    rcfg = cfg.zoo.recipe[name]
    if name not in (cfg.get("encoder") or {}):
        raise ValueError(
            f"zoo recipe {name!r} trains the encoder of conf/encoder/{name}.yaml, but encoder={list(cfg.encoder)} "
            f"does not include it"
        )
    module: ZooRecipe = instantiate(rcfg.module)
    datamodule = instantiate(rcfg.data, transform=module.transform, collate_fn=module.collate, needs=module.needs)
    run_dir = run.output_dir / name
    loggers = run.start_loggers(part=name, hyperparams=OmegaConf.to_container(rcfg, resolve=True))
    saver = SaveEncoder(rcfg.output)
    callbacks = [instantiate(c) for c in (cfg.zoo.get("callbacks") or {}).values() if c is not None]
    # The recipe's trainer keys (max_steps...) on top of conf/trainer, which does not list them all.
    overrides = OmegaConf.to_container(rcfg.get("trainer") or {}, resolve=True)
    trainer: pl.Trainer = instantiate(
        cfg.trainer, **overrides, default_root_dir=str(run_dir), callbacks=[*callbacks, saver], logger=loggers or False
    )
    trainer.fit(module, datamodule=datamodule)  # a failure: the run closes (and marks failed) these loggers
    run.close_loggers()  # one wandb run per recipe, also when several run in one process
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["global_step"] = float(trainer.global_step)
    print(f"zoo {name}: saved {saver.saved} after {trainer.global_step} steps; " + _fmt(metrics))
    return metrics


def report(cfg: DictConfig) -> dict[str, Any]:
    """Probe every zoo tower in ``zoo.out_dir`` against its random init; CKA between them; write report.json."""
    out_dir = Path(cfg.zoo.out_dir).expanduser()
    trained, random_init = {}, {}
    for name in cfg.encoder:
        path = out_dir / f"{name}.safetensors"
        if path.is_file():
            trained[name] = _encoder(cfg, name, str(path))
            random_init[f"{name}@init"] = _encoder(cfg, name, None)
    if not trained:
        raise FileNotFoundError(f"zoo report: no <encoder>.safetensors in {str(out_dir)!r}; train recipes first")
    rcfg = cfg.zoo.get("report_scenes") or {}
    result = probe_encoders({**trained, **random_init}, **rcfg)
    write_json(out_dir / "report.json", result)
    groups = list(next(iter(result["probe"].values())))
    print("zoo probe (linear, frozen [CLS]; trained / random init):")
    print(f"  {'encoder':<10} " + " ".join(f"{g:>16}" for g in groups))
    for name in trained:
        scores = [f"{result['probe'][name][g]:.3f}/{result['probe'][name + '@init'][g]:.3f}" for g in groups]
        print(f"  {name:<10} " + " ".join(f"{s:>16}" for s in scores))
    for pair, value in result["cka"].items():
        print(f"  linear CKA {pair}: {value:.3f}")
    print(f"zoo report written to {out_dir / 'report.json'}")
    return result


def use_zoo_weights(cfg: DictConfig) -> None:
    """Set ``encoder.<name>.weights`` of every chosen encoder that ``zoo.weights`` names (in place)."""
    weights = cfg.zoo.weights
    with open_dict(cfg):
        for name in cfg.encoder:
            if name not in weights:
                raise ValueError(f"zoo.weights has no file for encoder {name!r}; it names {list(weights)}")
            path = Path(str(weights[name])).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"zoo weights for encoder {name!r}: {str(path)!r} does not exist; build the zoo first with "
                    f"`python train.py +experiment=zoo/all` (same paths.root_dir / FUSION_ZOO_DIR)"
                )
            cfg.encoder[name].weights = str(path)


def _encoder(cfg: DictConfig, name: str, weights: str | None) -> TimmEncoder:
    enc_cfg = OmegaConf.merge(cfg.encoder[name], {"weights": weights})
    return instantiate(enc_cfg)


def _fmt(metrics: dict[str, float]) -> str:
    return json.dumps({k: round(v, 4) for k, v in sorted(metrics.items())})
