"""Build everything a run needs from the Hydra config, then train or evaluate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger

from fusion.data import FusionDataModule
from fusion.encoders import VisionEncoder
from fusion.lit import FusionLitModule
from fusion.tasks.base import VLTask, write_atomic


def build_encoders(cfg: DictConfig) -> dict[str, VisionEncoder]:
    """The frozen vision encoders chosen with ``encoder=[...]``, in that order."""
    chosen = cfg.get("encoder") or {}
    if not chosen:
        raise ValueError(
            "no vision encoder chosen: pick at least one from conf/encoder/, e.g. encoder=[clip_tiny,dino_tiny]"
        )
    encoders = {}
    for key, enc_cfg in chosen.items():
        if not isinstance(enc_cfg, DictConfig) or "_target_" not in enc_cfg:
            raise ValueError(f"encoder {key!r} has no _target_; encoder configs live in conf/encoder/<name>.yaml")
        encoders[key] = instantiate(enc_cfg)
    return encoders


def build(cfg: DictConfig) -> tuple[FusionDataModule, FusionLitModule]:
    """Data module and model, sharing the encoders' preprocessing and the text tokenizer."""
    encoders = build_encoders(cfg)
    text = instantiate(cfg.text)
    task: VLTask = instantiate(cfg.task)
    transforms = {name: enc.preprocess.transform() for name, enc in encoders.items()}
    datamodule = instantiate(cfg.data, task=task, transforms=transforms, tokenizer=text.tokenizer)
    model = instantiate(cfg.model, encoders=encoders, text=text, task=task, fusion=instantiate(cfg.fusion))
    return datamodule, model


def _loggers(cfg: DictConfig) -> list[Logger]:
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)
    return loggers


def _trainer(cfg: DictConfig, loggers: list[Logger]) -> pl.Trainer:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def _finish(loggers: list[Logger]) -> None:
    # A multirun executes its jobs in one process: close the wandb run so the next job gets its own.
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers never see half a file."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def _flat_metrics(results: list[dict[str, Any]]) -> dict[str, float]:
    # Attention and fuser statistics have their own files (attention/); metrics.json keeps the task metrics.
    return {k: float(v) for r in results for k, v in r.items() if "attn/" not in k and "fuser/" not in k}


def _save_config(cfg: DictConfig, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def _setup(cfg: DictConfig) -> tuple[Path, FusionDataModule, FusionLitModule, list[Logger], pl.Trainer]:
    """Seed, save the resolved config into the run folder, and build data, model, loggers and trainer."""
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    _save_config(cfg, output_dir)
    datamodule, model = build(cfg)
    loggers = _loggers(cfg)
    return output_dir, datamodule, model, loggers, _trainer(cfg, loggers)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model, then evaluate the best checkpoint on val and test; returns (and writes) metrics."""
    output_dir, datamodule, model, loggers, trainer = _setup(cfg)
    metrics: dict[str, float] = {}
    try:
        if cfg.get("train", True):
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        ckpt = best or None
        if cfg.get("test", True):
            metrics.update(_flat_metrics(trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt)))
            metrics.update(_flat_metrics(trainer.test(model, datamodule=datamodule, ckpt_path=ckpt)))
            task = model.task
            for stage, split in (("val", task.val_split), ("test", task.test_split)):
                majority = task.majority_accuracy(split)
                if majority is not None:
                    metrics[f"{stage}/majority_{task.metric_name}"] = majority
        if trainer.is_global_zero:
            write_json_atomic(output_dir / "metrics.json", metrics)
    finally:
        _finish(loggers)
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split``; writes metrics.json and attention statistics."""
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    if not ckpt.is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} is not a checkpoint file")
    output_dir, datamodule, model, loggers, trainer = _setup(cfg)
    split = str(cfg.split)
    try:
        model.task.check_split(split)
        model.predictions_path = output_dir / model.task.prediction_file
        if split == model.task.test_split:
            results = trainer.test(model, datamodule=datamodule, ckpt_path=str(ckpt))
        else:
            datamodule.val_split = split
            results = trainer.validate(model, datamodule=datamodule, ckpt_path=str(ckpt))
        metrics = {f"{split}/{k.split('/', 1)[1]}": v for k, v in _flat_metrics(results).items()}
        majority = model.task.majority_accuracy(split)
        if majority is not None:
            metrics[f"{split}/majority_{model.task.metric_name}"] = majority
        if trainer.is_global_zero:
            write_json_atomic(output_dir / "metrics.json", metrics)
    finally:
        _finish(loggers)
    return metrics
