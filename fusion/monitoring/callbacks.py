"""Lightning callbacks that publish the evaluation statistics, fed by the evaluation steps' outputs.

The LightningModule's ``validation_step`` / ``test_step`` return ``{"fusion": FusionOutput}`` (the
multimodal transformer, with the attention probabilities when ``training.attention_stats`` asks for them)
or, with the LM head, ``{"lm": LMHeadOutput, "fused": FusedTokens}`` (``"lm"`` absent or without
attentions when none were read out); these callbacks accumulate over the epoch, log the scalars, and on
rank 0 write the files under ``<output_dir>/attention/<stage>/`` and the wandb table and figures. What they
read from the module (no import of fusion.training, a layer above): ``encoder_names``, ``attention_stats``,
``output_dir``, ``hparams.drop_encoders``; ``lm_attention_shape`` (``(num_layers, num_heads)`` of the LM
head; its presence selects the LM's statistic); ``mixes_encoders`` and ``reports_encoder_weights``, from
the module itself where it has them, else from its ``fusion`` (a
:class:`~fusion.model.transformer.FusionModel`, which also gives the multimodal transformer's depth and heads).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger, WandbLogger
from torchmetrics import Metric

from fusion.fusers.base import FusedTokens
from fusion.model.transformer import FusionOutput
from fusion.monitoring.attention_stats import (
    AttentionOverEncoders,
    LMAttentionOverEncoders,
    save_stats,
    scalar_metrics,
    stats_rows,
)
from fusion.monitoring.fuser_weights import FuserWeights, fuser_scalars, save_fuser_weights

__all__ = ["AttentionStatsCallback", "EvalStatistics", "FuserWeightsCallback", "Target"]

Stage = Literal["val", "test"]


def _wandb(loggers: Sequence[Logger]) -> list[WandbLogger]:
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def _model_flag(pl_module: pl.LightningModule, name: str) -> bool:
    """``pl_module.<name>`` where the module has it (the LM head's), else ``pl_module.fusion.<name>``."""
    if hasattr(pl_module, name):
        return bool(getattr(pl_module, name))
    return bool(getattr(pl_module.fusion, name))


@dataclass
class Target:
    """Where one epoch's statistic goes: ``folder`` for files (with ``extra`` in their JSON), ``prefix`` of
    the wandb keys, the wandb ``loggers``."""

    folder: Path
    extra: dict[str, Any]
    prefix: str
    loggers: list[WandbLogger]


class EvalStatistics(pl.Callback, ABC):
    """Accumulate one statistic over each validation / test epoch and publish it.

    ``output_dir``: the run folder (None: the module's ``output_dir``, i.e. ``training.output_dir``); without
    one, only the scalars are logged. Logged under ``{key}/...`` for val and ``test/{key}/...`` for test.
    """

    key: ClassVar[str]

    def __init__(self, output_dir: str | Path | None = None) -> None:
        self.output_dir = Path(output_dir) if output_dir else None
        self.metrics: dict[str, Metric] = {}

    # ---- what a statistic defines ----------------------------------------------------------------
    @abstractmethod
    def make_metric(self, pl_module: pl.LightningModule) -> Metric | None:
        """The accumulator for one epoch, or None when the module has nothing of this kind to report."""

    @abstractmethod
    def update(self, metric: Metric, outputs: Mapping[str, Any]) -> None:
        """Feed one batch's step outputs (``{"fusion": ...}`` or ``{"lm": ..., "fused": ...}``)."""

    @abstractmethod
    def scalars(self, value: torch.Tensor, metric: Metric, prefix: str) -> dict[str, float]:
        """The logged scalars of the computed ``value``."""

    @abstractmethod
    def publish(self, value: torch.Tensor, metric: Metric, where: Target) -> None:
        """Files into ``where.folder`` and the wandb table and figures (rank 0 only)."""

    # ---- the hooks -------------------------------------------------------------------------------
    def _start(self, pl_module: pl.LightningModule, stage: Stage) -> None:
        metric = self.make_metric(pl_module)
        if metric is None:
            self.metrics.pop(stage, None)
        else:
            self.metrics[stage] = metric.to(pl_module.device)

    def _update(self, stage: Stage, outputs: Any) -> None:
        metric = self.metrics.get(stage)
        if metric is not None and isinstance(outputs, Mapping):
            self.update(metric, outputs)

    def _end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        metric = self.metrics.pop(stage, None)
        if metric is None:
            return
        value = metric.compute()  # synced over DDP ranks
        if trainer.sanity_checking:
            return
        prefix = self.key if stage == "val" else f"{stage}/{self.key}"
        pl_module.log_dict(self.scalars(value, metric, prefix))
        output_dir = self.output_dir or getattr(pl_module, "output_dir", None)
        if trainer.is_global_zero and output_dir is not None:
            drop = list(getattr(pl_module.hparams, "drop_encoders", []))
            extra = {"split": stage, "epoch": trainer.current_epoch, "drop_encoders": drop}
            where = Target(Path(output_dir) / "attention" / stage, extra, prefix, _wandb(pl_module.loggers))
            self.publish(value.cpu(), metric, where)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(pl_module, "val")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(pl_module, "test")

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update("val", outputs)

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update("test", outputs)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(trainer, pl_module, "test")


class AttentionStatsCallback(EvalStatistics):
    """Attention-over-encoder statistics (``training.attention_stats``): ``attn/...`` scalars, ``attention.json``,
    ``attention.csv`` and heatmaps, a wandb table and one image per heatmap. The multimodal transformer's
    query kinds are ``cls`` and ``text`` (:class:`AttentionOverEncoders`), the LM head's ``prompt`` and
    ``answer`` (:class:`LMAttentionOverEncoders`, when the module has ``lm_attention_shape``)."""

    key = "attn"

    def make_metric(self, pl_module: pl.LightningModule) -> Metric | None:
        if not getattr(pl_module, "attention_stats", False):
            return None
        mixed = _model_flag(pl_module, "mixes_encoders")
        lm_shape = getattr(pl_module, "lm_attention_shape", None)
        if lm_shape is not None:
            num_layers, num_heads = lm_shape
            return LMAttentionOverEncoders(pl_module.encoder_names, num_layers, num_heads, mixed)
        fusion = pl_module.fusion
        return AttentionOverEncoders(pl_module.encoder_names, fusion.depth, fusion.num_heads, mixed)

    def update(self, metric: Metric, outputs: Mapping[str, Any]) -> None:
        if isinstance(metric, LMAttentionOverEncoders):
            lm = outputs.get("lm")  # an LMHeadOutput
            if lm is not None and lm.attentions is not None:
                metric.update(lm.attentions, lm.inputs.groups)
            return
        out = outputs.get("fusion")
        if isinstance(out, FusionOutput) and out.attentions is not None:
            metric.update(out.attentions, out.key_groups, out.text_query_mask)

    def scalars(self, value: torch.Tensor, metric: Metric, prefix: str) -> dict[str, float]:
        return scalar_metrics(value, metric.group_names, prefix=prefix, query_kinds=metric.query_kinds)

    def publish(self, value: torch.Tensor, metric: Metric, where: Target) -> None:
        groups, queries = metric.group_names, metric.query_kinds
        paths = save_stats(value, groups, where.folder, extra=where.extra, query_kinds=queries)
        rows = stats_rows(value, groups, query_kinds=queries)
        columns = list(rows[0])
        for logger in where.loggers:
            table = [[r[c] for c in columns] for r in rows]
            logger.log_table(key=f"{where.prefix}/table", columns=columns, data=table)
            for file_name, path in paths.items():
                if file_name.endswith(".png"):  # one key per figure: their sizes differ
                    logger.log_image(key=f"{where.prefix}/{Path(file_name).stem}", images=[str(path)])


class FuserWeightsCallback(EvalStatistics):
    """The fuser's own share of each encoder (fusers that mix encoders; cheap, so always collected):
    ``fuser/<encoder>`` scalars, ``fuser_weights.json`` and its bar chart, a wandb table and image."""

    key = "fuser"

    def make_metric(self, pl_module: pl.LightningModule) -> Metric | None:
        return FuserWeights(pl_module.encoder_names) if _model_flag(pl_module, "reports_encoder_weights") else None

    def update(self, metric: Metric, outputs: Mapping[str, Any]) -> None:
        fusion, fused = outputs.get("fusion"), outputs.get("fused")
        if isinstance(fusion, FusionOutput):
            weights = fusion.encoder_weights
        elif isinstance(fused, FusedTokens):
            weights = fused.encoder_weights
        else:
            return
        if weights is not None:
            metric.update(weights)

    def scalars(self, value: torch.Tensor, metric: Metric, prefix: str) -> dict[str, float]:
        return fuser_scalars(value, metric.encoder_names, prefix=prefix)

    def publish(self, value: torch.Tensor, metric: Metric, where: Target) -> None:
        names = metric.encoder_names
        paths = save_fuser_weights(value, names, where.folder, where.extra)
        for logger in where.loggers:
            rows = [[n, float(w)] for n, w in zip(names, value.tolist(), strict=True)]
            logger.log_table(key=f"{where.prefix}/table", columns=["encoder", "weight"], data=rows)
            logger.log_image(key=f"{where.prefix}/fuser_weights", images=[str(paths["fuser_weights.png"])])
