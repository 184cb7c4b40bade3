"""Build everything a run needs from the Hydra config, then train, evaluate or extract (set-up and tear-down:
:mod:`fusion.run.context`)."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.loggers import Logger

from fusion.data.cache import build_cache, ensure_cache, images_of
from fusion.data.cache.settings import CacheSettings
from fusion.data.module import FusionDataModule
from fusion.encoders.vision import VisionEncoder
from fusion.io import write_json
from fusion.run.context import open_run
from fusion.tasks.base import VLTask
from fusion.training.module import EVAL_MODE_WARNING, FusionBase
from fusion.training.preempt import Requeued, RequeueOnSignal, slurm_job_id
from fusion.training.resume import check_compatible, checkpoint_step, load_checkpoint, resume_path

log = logging.getLogger(__name__)


def build_encoders(cfg: DictConfig) -> dict[str, VisionEncoder]:
    """The frozen vision encoders chosen with ``encoder=[...]``, in that order."""
    chosen = cfg.get("encoder") or {}
    if not chosen:
        raise ValueError(
            "no vision encoder chosen: pick at least one from conf/encoder/, e.g. encoder=[clip_tiny,dino_tiny]"
        )
    crop = cfg.get("image_crop")
    encoders = {}
    for key, enc_cfg in chosen.items():
        if not isinstance(enc_cfg, DictConfig) or "_target_" not in enc_cfg:
            raise ValueError(f"encoder {key!r} has no _target_; encoder configs live in conf/encoder/<name>.yaml")
        encoders[key] = instantiate(enc_cfg)
        if crop is not None:  # part of the fingerprint: caches and checkpoints keep preprocessings apart
            encoders[key].preprocess = encoders[key].preprocess.with_crop_mode(str(crop))
    return encoders


def cache_settings(cfg: DictConfig, always: bool = False) -> CacheSettings | None:
    """The feature-cache settings of ``cfg.cache``; None when the cache is not enabled, unless ``always``."""
    cache = cfg.get("cache")
    if cache is None and always:
        raise ValueError("the config has no cache group; add `- cache: default` to its defaults list")
    if cache is None or not (always or cache.get("enabled", False)):
        return None
    names = [f.name for f in dataclasses.fields(CacheSettings)]
    settings = CacheSettings(**{n: cache[n] for n in names if cache.get(n) is not None})
    pooled, model_k = settings.tokens_per_encoder, cfg.get("fusion", {}).get("tokens_per_encoder")
    if pooled is not None and not always and pooled != model_k:
        # Caught before any cache is built: a cache pooled to K feeds only a model that pools to the same K
        # (the fuser would refuse it at the first forward, after the build).
        raise ValueError(
            f"cache.tokens_per_encoder={pooled} stores the patch grids pooled to {pooled} tokens, but "
            f"fusion.tokens_per_encoder={model_k}: set fusion.tokens_per_encoder={pooled}, or "
            "cache.tokens_per_encoder=null (a full cache serves any fusion.tokens_per_encoder)"
        )
    return settings


def build(cfg: DictConfig) -> tuple[FusionDataModule, FusionBase]:
    """Data module and model, sharing the encoders (and their preprocessing) and the text tokenizer."""
    encoders = build_encoders(cfg)
    text = instantiate(cfg.text)
    task: VLTask = instantiate(cfg.task)
    transforms = {name: enc.preprocess.transform() for name, enc in encoders.items()}
    # Partial, then called: Hydra would turn the dataclass and module arguments into configs.
    make_datamodule = instantiate(cfg.data, _partial_=True)
    datamodule = make_datamodule(
        task=task, transforms=transforms, tokenizer=text.tokenizer, encoders=encoders, cache=cache_settings(cfg)
    )
    model = instantiate(cfg.training, encoders=encoders, text=text, task=task, fusion=instantiate(cfg.fusion))
    return datamodule, model


def _trainer(cfg: DictConfig, loggers: list[Logger], model: FusionBase) -> pl.Trainer:
    # The callbacks group decides which statistics are written (callbacks.attention_stats=null: none);
    # without one (eval.py) the module adds its own.
    model.stats_callbacks = cfg.get("callbacks") is None
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def _flat_metrics(results: list[dict[str, Any]]) -> dict[str, float]:
    # Attention and fuser statistics have their own files (attention/); metrics.json keeps the task metrics.
    return {k: float(v) for r in results for k, v in r.items() if "attn/" not in k and "fuser/" not in k}


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the model, then evaluate the best checkpoint on val and test; returns (and writes) metrics.

    An error is logged to the run's log before it propagates: ``eval.py mode=collect`` reads the reason of
    a failed sweep element from there.
    """
    try:
        return _train(cfg)
    except Exception:
        log.exception("training failed")
        raise


def _train(cfg: DictConfig) -> dict[str, float]:
    with open_run(cfg, "train") as run:
        datamodule, model = build(cfg)
        trainer = _trainer(cfg, run.start_loggers(), model)
        metrics: dict[str, float] = {}
        if cfg.get("train", True):
            # ckpt_path, or the run folder's own newest checkpoint: a requeued job continues where it stopped.
            ckpt = resume_path(cfg.get("ckpt_path"), run.output_dir)
            if ckpt is not None:
                check_compatible(ckpt, model)
                log.info("resuming from %s (step %d)", ckpt, checkpoint_step(ckpt))
            with warnings.catch_warnings():
                # Expected (frozen encoders): the model says so in its own line (report_eval_modes).
                warnings.filterwarnings("ignore", message=EVAL_MODE_WARNING)
                trainer.fit(model, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
            requeue = next((cb for cb in trainer.callbacks if isinstance(cb, RequeueOnSignal) and cb.stopped), None)
            if requeue is not None:
                log.warning("stopped for a requeue: the requeued job resumes, evaluates and writes metrics.json")
                run.close_loggers()  # before the requeue stops this job's processes (wandb's service among them)
                requeue.requeue(trainer)
                raise Requeued(slurm_job_id())  # not a return: the job is not done (see fusion.training.preempt)
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
        return run.finish(metrics)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split``; writes metrics.json and attention statistics."""
    if cfg.get("ckpt_path") is None:
        raise ValueError("eval.py needs ckpt_path=<a checkpoint>, e.g. <run>/checkpoints/last.ckpt")
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    load_checkpoint(ckpt)  # before the run folder is written to: a file that is no checkpoint is named now
    with open_run(cfg, "eval") as run:
        datamodule, model = build(cfg)
        trainer = _trainer(cfg, run.start_loggers(), model)
        split = str(cfg.split)
        model.task.check_split(split)
        model.predictions_path = run.output_dir / model.task.prediction_file
        if split == model.task.test_split:
            results = trainer.test(model, datamodule=datamodule, ckpt_path=str(ckpt))
        else:
            datamodule.val_split = split
            results = trainer.validate(model, datamodule=datamodule, ckpt_path=str(ckpt))
        metrics = {f"{split}/{k.split('/', 1)[1]}": v for k, v in _flat_metrics(results).items()}
        majority = model.task.majority_accuracy(split)
        if majority is not None:
            metrics[f"{split}/majority_{model.task.metric_name}"] = majority
        return run.finish(metrics)


def extract(cfg: DictConfig) -> dict[str, str]:
    """Build the feature cache of every configured encoder for the task's images (``eval.py mode=extract``).

    With ``cache.shard``/``cache.num_shards`` only that shard is built; the shards merge into one cache
    the first time a run (or an extract without sharding) opens it. Returns encoder -> cache folder.
    """
    settings = cache_settings(cfg, always=True)
    shard, num_shards = cfg.cache.get("shard"), cfg.cache.get("num_shards")
    if (shard is None) != (num_shards is None):
        raise ValueError(f"give both cache.shard and cache.num_shards (got shard={shard}, num_shards={num_shards})")
    # No record: an extraction writes caches.json into its folder, never config_resolved.yaml.
    with open_run(cfg, "extract", record=False) as run:
        encoders = build_encoders(cfg)
        task: VLTask = instantiate(cfg.task)
        task.prepare_data()
        splits = list(cfg.cache.get("splits") or dict.fromkeys(task.splits))
        for split in splits:  # extraction decodes the images: a missing one is named with its annotation now
            task.check_images(split)
        images = images_of(ex for split in splits for ex in task.examples(split))
        device = settings.build_device()
        paths = {}
        for name, encoder in encoders.items():
            encoder.to(device)
            common = {
                "dtype": settings.dtype, "tokens_per_encoder": settings.tokens_per_encoder,
                "batch_size": settings.batch_size, "num_workers": settings.num_workers,
            }
            if num_shards is None:
                cache = ensure_cache(encoder, images, settings.dir, rebuild=settings.rebuild, **common)
            else:
                cache = build_cache(
                    encoder, images, settings.dir, shard=int(shard), num_shards=int(num_shards), **common
                )
            encoder.to("cpu")
            paths[name] = str(cache.path)
            log.info("encoder %s: %d images of splits %s in %s", name, len(cache), splits, cache.path)
        written = {"splits": splits, "images": len(images), "caches": paths}
        write_json(run.output_dir / "caches.json", written, sort_keys=True)
    return paths
