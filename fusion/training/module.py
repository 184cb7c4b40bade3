"""The LightningModules: frozen encoders -> fusion -> head -> loss and metrics.

:class:`FusionBase` owns what every task's module shares (encoders, text encoder, fusion model, head,
VE-dropout, the checked options, the optimiser, checkpoints, the evaluation epoch's hooks);
:class:`FusionLitModule` is the classification module (VQA, NLI, ...); the retrieval module
(:class:`fusion.retrieval.module.RetrievalLitModule`) is its sibling. Statistics go to the callbacks of
:mod:`fusion.monitoring.callbacks` through the evaluation steps' outputs.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric, Metric

from fusion.data.distributed import gather_prediction_rows
from fusion.encoders.text import TextEncoder
from fusion.encoders.vision import VisionEncoder
from fusion.model.dropout import EncoderDropout
from fusion.model.heads import ClassifierHead
from fusion.model.transformer import FusionModel, FusionOutput
from fusion.monitoring.attention_stats import AttentionOverEncoders
from fusion.monitoring.callbacks import AttentionStatsCallback, FuserWeightsCallback
from fusion.options import number
from fusion.tasks.base import VLTask
from fusion.training.optim import (
    GROUPS_RULE,
    OptimizerFactory,
    SchedulerFactory,
    configure,
    cosine_with_warmup,
    regroup_legacy_optimizer_state,
)

log = logging.getLogger(__name__)

ENCODER_PREFIX = "encoders."
# Lightning's warning at the start of fit about modules in eval mode (fusion.run.commands filters it while fitting):
# the frozen encoders always are; FusionLitModule.report_eval_modes says so in one line instead.
EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"
# What an evaluation step returns: {"fusion": FusionOutput}, read by fusion.monitoring.callbacks.
StepOutput = dict[str, FusionOutput]
Stage = Literal["val", "test"]
# Constructor arguments that are not hyperparameters: modules, the task, factories (partials do not load with
# torch.load(weights_only=True); their config is in the run folder's config_resolved.yaml).
NOT_HPARAMS = ["encoders", "text", "task", "fusion", "head", "optimizer", "scheduler"]


def _all_frozen(module: nn.Module) -> bool:
    """Whether ``module`` has parameters and none of them trains."""
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def annotated_count(batch: Mapping[str, Any]) -> int:
    """How many examples of ``batch`` the task's loss averages over: those whose ``targets`` are not -1 (a
    label index (B,), or soft scores (B, C) that are all -1 for an unannotated question)."""
    targets = batch["targets"]
    return int((targets.reshape(targets.shape[0], -1)[:, 0] >= 0).sum())


def checked_options(
    lr: Any, weight_decay: Any, warmup_ratio: Any, ve_dropout: Any, drop_encoders: Sequence[Any]
) -> dict[str, Any]:
    """The numeric options checked where the module is built, so that a bad value names its key (not torch's
    AdamW); plain containers, not OmegaConf ones: checkpoints must load with torch.load(weights_only=True)."""
    if isinstance(ve_dropout, Mapping):
        ve_dropout = {
            str(k): number(f"training.ve_dropout.{k}", v, low=0.0, high=1.0, high_open=True)
            for k, v in ve_dropout.items()
        }
    else:
        ve_dropout = number("training.ve_dropout", ve_dropout, low=0.0, high=1.0, high_open=True)
    return {
        "lr": number("training.lr", lr, low=0.0, low_open=True),
        "weight_decay": number("training.weight_decay", weight_decay, low=0.0),
        "warmup_ratio": number("training.warmup_ratio", warmup_ratio, low=0.0, high=1.0),
        "ve_dropout": ve_dropout,
        "drop_encoders": [str(n) for n in drop_encoders],
    }



class FusionBase(pl.LightningModule, ABC):
    """What every fusion LightningModule shares; the vision encoders stay frozen.

    Builds the fusion model on the encoders' and text encoder's sizes and the task's head; checks the numeric
    options where they are built (a bad value names its key); owns VE-dropout, the optimiser and schedule
    (``optimizer`` / ``scheduler`` partials from config, see :mod:`fusion.training.optim`), checkpoint hygiene
    and the evaluation epoch's hooks, which call :meth:`start_eval`, :meth:`eval_step` and :meth:`end_eval`.

    Frozen encoder weights are not stored in checkpoints (they come from the encoder configs); a
    checkpoint carries each encoder's fingerprint instead, and loading it with different encoders
    fails with a message naming the encoder and what differs.
    """

    def __init__(
        self,
        encoders: Mapping[str, VisionEncoder],
        text: TextEncoder,
        task: VLTask,
        fusion: Callable[..., FusionModel] = FusionModel,
        head: Callable[..., nn.Module] = ClassifierHead,
        ve_dropout: float | Mapping[str, float] = 0.0,
        drop_encoders: Sequence[str] = (),
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        warmup_ratio: float = 0.1,
        attention_stats: bool = True,
        output_dir: str | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        options = checked_options(lr, weight_decay, warmup_ratio, ve_dropout, drop_encoders)
        lr, weight_decay, warmup_ratio, ve_dropout, drop_encoders = options.values()
        if not encoders:
            raise ValueError("the encoder list is empty: choose at least one, e.g. encoder=[clip_tiny]")
        self.save_hyperparameters(ignore=NOT_HPARAMS)
        # A subclass's **kwargs reach Lightning as given (from its own frame): the checked, plain values win.
        self.hparams.update(options)
        # Without a config (tests, older run records): AdamW and the cosine schedule from lr / weight_decay /
        # warmup_ratio, which is what conf/training/default.yaml's nodes give.
        self.optimizer_factory: OptimizerFactory = optimizer or partial(
            torch.optim.AdamW, lr=lr, weight_decay=weight_decay
        )
        self.scheduler_factory: SchedulerFactory = scheduler or partial(cosine_with_warmup, warmup_ratio=warmup_ratio)
        self.encoders = nn.ModuleDict(dict(encoders))
        self.encoder_names = list(encoders)
        self.text = text
        self.task = task
        self.fusion = fusion(
            encoder_dims={n: e.embed_dim for n, e in encoders.items()},
            encoder_tokens={n: e.num_tokens for n, e in encoders.items()},
            encoder_prefix={n: e.num_prefix_tokens for n, e in encoders.items()},
            text_dim=text.hidden_size,
            num_images=task.images_per_example,
        )
        self.head = self.build_head(head)
        self.ve_dropout = EncoderDropout(self.encoder_names, p=ve_dropout, drop_encoders=list(drop_encoders))
        self.metrics = nn.ModuleDict({stage: task.metric() for stage in ("val", "test")})
        # Whether the evaluation steps return the attention probabilities (for AttentionStatsCallback).
        self.attention_stats = attention_stats
        self.output_dir = Path(output_dir) if output_dir else None
        self._fingerprints: dict[str, dict] | None = None
        # Set by eval.py: where the task's official prediction file goes.
        self.predictions_path: Path | None = None
        # configure_callbacks adds the statistics callbacks a trainer lacks; train.py turns that off, so
        # that its callbacks group decides (callbacks.attention_stats=null: no attention files).
        self.stats_callbacks = True

    def build_head(self, head: Callable[..., nn.Module]) -> nn.Module:
        """The head from its config partial: a classifier over the task's answers on the fused width."""
        return head(width=self.fusion.width, num_classes=self.task.num_classes)

    # ---- shared steps --------------------------------------------------------------------------
    def encode_images(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Each encoder's features of the batch's images: (B, N_e, D_e), or (B, I, N_e, D_e) with I images.

        They come from ``batch["features"]`` when the data module read them from its feature cache (cast
        here, on the model's device), else the frozen encoder runs on ``batch["images"]``.
        """
        cached = batch.get("features") or {}
        return {
            name: cached[name].to(self.dtype) if name in cached else self._encode(enc, batch["images"][name])
            for name, enc in self.encoders.items()
        }

    @staticmethod
    def _encode(encoder: VisionEncoder, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D); several images per example, (B, I, 3, H, W) -> (B, I, N, D)."""
        if images.dim() == 5:
            return encoder(images.flatten(0, 1)).unflatten(0, images.shape[:2])
        return encoder(images)

    # ---- the evaluation epoch ------------------------------------------------------------------
    def start_eval(self, stage: Stage) -> None:
        """Called as a validation / test epoch starts (nothing by default)."""

    @abstractmethod
    def eval_step(self, batch: Mapping[str, Any], stage: Stage) -> StepOutput | None:
        """Score one evaluation batch; the returned fusion output feeds the statistics callbacks."""

    @abstractmethod
    def end_eval(self, stage: Stage) -> None:
        """Log the epoch's metrics (and write the predictions eval.py asked for)."""

    def on_validation_epoch_start(self) -> None:
        self.start_eval("val")

    def on_test_epoch_start(self) -> None:
        self.start_eval("test")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> StepOutput | None:
        return self.eval_step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> StepOutput | None:
        return self.eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self.end_eval("val")

    def on_test_epoch_end(self) -> None:
        self.end_eval("test")

    def configure_callbacks(self) -> list[pl.Callback]:
        """The statistics callbacks the trainer lacks (eval.py's trainer has no callbacks group), so that the
        attention and fuser statistics are published whichever entry point runs the module."""
        if not self.stats_callbacks:
            return []
        present = getattr(self._trainer, "callbacks", []) if self._trainer is not None else []
        wanted = (AttentionStatsCallback(), FuserWeightsCallback())
        return [cb for cb in wanted if not any(isinstance(c, type(cb)) for c in present)]

    # ---- training start ------------------------------------------------------------------------
    def on_train_start(self) -> None:
        if self.trainer.is_global_zero:
            self.report_eval_modes()

    def report_eval_modes(self) -> tuple[list[str], list[str]]:
        """Log which modules are in eval mode as training starts; returns their names, (frozen on purpose,
        others). Frozen parts (the encoders, a frozen text model) stay in eval mode by design: one info line
        says so, and fusion.run.commands hides Lightning's warning about them (:data:`EVAL_MODE_WARNING`); a module
        that trains but is in eval mode gets a warning naming it."""
        frozen = {n for n, m in self.named_modules() if n and _all_frozen(m)}

        def frozen_part(name: str) -> str | None:
            """The outermost frozen module holding ``name`` (or being it)."""
            parts = name.split(".")
            return next((p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in frozen), None)

        in_eval = [n for n, m in self.named_modules() if n and not m.training]
        expected = [n for n in in_eval if frozen_part(n) is not None]
        others = [n for n in in_eval if frozen_part(n) is None]
        if expected:
            parts = sorted({frozen_part(n) for n in expected})
            log.info(
                "%d modules of the frozen %s are in eval mode on purpose (they never train): Lightning's "
                "'module(s) in eval mode' warning about them is expected and not shown", len(expected),
                ", ".join(parts),
            )
        if others:
            more = f" (+{len(others) - 8} more)" if len(others) > 8 else ""
            log.warning("%d modules that train are in eval mode as training starts: %s%s", len(others),
                        ", ".join(others[:8]), more)
        return expected, others

    # ---- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        """The config's optimiser over :func:`~fusion.training.optim.param_groups` (weight decay off for the
        ``no_weight_decay()`` names, biases and norms), its scheduler stepped every optimiser step."""
        total = int(self.trainer.estimated_stepping_batches)
        return configure(self, self.optimizer_factory, self.scheduler_factory, total, self.device)

    # ---- checkpoints ---------------------------------------------------------------------------
    def encoder_fingerprints(self) -> dict[str, dict]:
        if self._fingerprints is None:  # hashing base-size weights takes a moment; they never change
            self._fingerprints = {n: e.fingerprint() for n, e in self.encoders.items()}
        return self._fingerprints

    def unsaved_keys(self) -> set[str]:
        """State-dict keys left out of checkpoints because the config rebuilds them: the frozen encoders'
        weights (a subclass adds its own frozen parts). Resuming checks a checkpoint against the other keys."""
        return {k for k in self.state_dict() if k.startswith(ENCODER_PREFIX)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(ENCODER_PREFIX)]:
            del state[key]
        checkpoint["encoder_fingerprints"] = self.encoder_fingerprints()
        checkpoint["groups_rule"] = GROUPS_RULE  # the optimiser state's groups follow no_weight_decay()
        # The head's classes are indices into this list: a task that derives its vocabulary from data
        # (VQA, GQA) must give the same list when the checkpoint is evaluated.
        checkpoint["task_answers"] = list(self.task.answers)
        checkpoint["task_name"] = self.task.name

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_answers(checkpoint.get("task_answers"), checkpoint.get("task_name"))
        saved = checkpoint.get("encoder_fingerprints", {})
        current = self.encoder_fingerprints()
        if set(saved) != set(current):
            raise ValueError(
                f"checkpoint was trained with encoders {sorted(saved)}, but the config builds {sorted(current)}; "
                "choose the same encoders (e.g. the same +experiment and encoder=[...])"
            )
        for name, fp in saved.items():
            differing = sorted(k for k in set(fp) | set(current[name]) if fp.get(k) != current[name].get(k))
            if differing:
                raise ValueError(
                    f"encoder {name!r} differs from the one the checkpoint was trained with in {differing}: "
                    f"checkpoint {[fp.get(k) for k in differing]} vs config {[current[name].get(k) for k in differing]}"
                )
        state = checkpoint["state_dict"]
        for key, value in self.encoders.state_dict(prefix=ENCODER_PREFIX).items():
            state.setdefault(key, value)
        # A run saved before the no_weight_decay() groups resumes with its optimiser moments, regrouped.
        regroup_legacy_optimizer_state(checkpoint, self)

    def _check_answers(self, saved: list[str] | None, saved_task: str | None = None) -> None:
        """Refuse a checkpoint whose answer vocabulary differs from the task's (its predictions would be
        read against the wrong answers), naming both tasks when it was trained on another one."""
        current = list(self.task.answers)
        if saved is None or saved == current:
            return  # the same answers under another task name (OK-VQA with VQAv2's pinned vocabulary) is fine
        if saved_task is not None and saved_task != self.task.name:
            raise ValueError(
                f"checkpoint was trained on task {saved_task!r} ({len(saved)} answers), but the config's task is "
                f"{self.task.name!r} ({len(current)} answers); evaluate it with task {saved_task!r} (the task or "
                "+experiment it was trained with)"
            )
        first = next(
            (i for i, (a, b) in enumerate(zip(saved, current, strict=False)) if a != b), min(len(saved), len(current))
        )

        def at(answers: list[str]) -> str:
            return repr(answers[first]) if first < len(answers) else "(end)"

        raise ValueError(
            f"checkpoint was trained with a {len(saved)}-answer vocabulary for task {self.task.name!r}, but the "
            f"task now gives {len(current)} answers, first differing at index {first}: checkpoint {at(saved)} vs "
            f"task {at(current)}; evaluate with the training data's vocabulary (e.g. pin task.vocab_file=<the "
            "answer_vocab_*.json of the training run>)"
        )


@dataclass
class ScoredBatch:
    """One batch scored as evaluation scores it (:meth:`TaskModule.score_answers`): what the analysis modes read.

    ``answers``: each example's answer as a string (the classifier's argmax entry of ``task.answers``; the LM
    head's generated string, or its best-ranked entry of ``task.answers``). ``logits`` (B, C): the scores over
    ``task.answers`` where the head ranks them (the classifier's logits, the LM head's rank-classification
    log-likelihoods), None where the LM head generates. ``out``: the forward pass's output, with the attention
    read-out when asked for (:class:`~fusion.model.transformer.FusionOutput`; the LM head's teacher-forced
    :class:`~fusion.model.lm.LMHeadOutput`, None without a labelled example); ``rows`` (R,) long: the batch rows
    ``out`` holds, in order (None: every row; the LM head's pass covers the labelled ones); ``fused``: the LM
    head's visual tokens (None for the classifier).
    """

    answers: list[str]
    logits: torch.Tensor | None
    out: Any
    rows: torch.Tensor | None = None
    fused: Any = None


class TaskModule(FusionBase):
    """A module that answers the task's questions, scored by the task's official metric: the classifier
    (:class:`FusionLitModule`) and the LM head (:class:`fusion.training.lm_module.LMLitModule`). Owns the
    evaluation loss, the prediction rows eval.py asks for, and the end of an evaluation epoch.

    What the analysis modes (:mod:`fusion.analysis`) call, so that they run on either head:
    :meth:`score_answers` (one evaluation batch, the numbers eval.py gives), :meth:`attention_statistics` and
    :meth:`update_attention_statistics` (the head's own attention-over-encoder statistic).
    """

    @abstractmethod
    def score_answers(
        self, batch: Mapping[str, Any], metric: Metric, loss_mean: MeanMetric, output_attentions: bool = False
    ) -> ScoredBatch:
        """Answer one batch as the evaluation step does, feeding the task ``metric`` and the mean loss
        ``loss_mean`` (weighted by the batch's annotated examples)."""

    @abstractmethod
    def attention_statistics(self) -> Metric:
        """A fresh attention-over-encoder statistic of this head (``group_names``, ``query_kinds``, ``compute()``
        ``(Q, L, H, G)``): :class:`~fusion.monitoring.attention_stats.AttentionOverEncoders` over the fusion
        transformer, :class:`~fusion.monitoring.attention_stats.LMAttentionOverEncoders` over the LM's layers."""

    @abstractmethod
    def update_attention_statistics(
        self, stats: Metric, scored: ScoredBatch, rows: torch.Tensor | None = None
    ) -> None:
        """Add ``scored``'s attention read-out (``score_answers(..., output_attentions=True)``) to ``stats``;
        ``rows`` (B,) bool: only those rows of the batch (None: all)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The evaluation loss, per annotated example over all ranks (score_batch). Not self.log(sync_dist=True):
        # Lightning mean-syncs its integer batch-size count, which floors when ranks hold unequal shares
        # (Lightning issue #21838). A batch without any annotated example weighs 0 (its loss may be NaN: left
        # out); a split without labels has no loss.
        self.eval_loss = nn.ModuleDict({stage: MeanMetric(nan_strategy="ignore") for stage in ("val", "test")})
        self._prediction_rows: list[dict[str, Any]] = []

    def end_eval(self, stage: Stage) -> None:
        """Write the gathered prediction rows (eval.py), log the task's metrics and loss, reset them."""
        if self.predictions_path is not None and not self.trainer.sanity_checking:
            # Under DDP each rank holds its share of the rows: all ranks gather, rank 0 writes.
            rows = gather_prediction_rows(self.trainer, stage, self._prediction_rows)
            if self.trainer.is_global_zero:
                self.task.write_predictions(rows, self.predictions_path)
        self._prediction_rows = []
        if self._scored(stage):
            self._log_task_metrics(stage)
        self.metrics[stage].reset()
        self.eval_loss[stage].reset()

    def _scored(self, stage: str) -> bool:
        """Whether the split evaluated in ``stage`` has labels; an unlabelled one gets predictions, no metrics
        (its accuracy would read 0 and its loss would be of nothing)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        split = getattr(datamodule, "val_split", self.task.val_split) if stage == "val" else self.task.test_split
        if self.task.is_labelled(split):
            return True
        if not self.trainer.sanity_checking:
            log.info("split %s has no labels: predictions only, no %s metrics", split, stage)
        return False

    def _log_task_metrics(self, stage: str) -> None:
        name = self.task.metric_name
        values = {f"{stage}/{name}" + (f"_{k}" if k else ""): v for k, v in self.metrics[stage].compute().items()}
        headline = f"{stage}/{name}"
        self.log(headline, values.pop(headline), prog_bar=stage == "val")
        self.log_dict(values)
        loss = self.eval_loss[stage].compute()  # synced: the same on every rank
        if not torch.isnan(loss):
            self.log(f"{stage}/loss", loss)


class FusionLitModule(TaskModule):
    """Classification (VQA, NLI, memes...): the head on the fused [CLS] gives the task's answer logits;
    the task's loss and official metric, its prediction file when eval.py asks for one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.train_acc = MeanMetric()

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Any], output_attentions: bool = False) -> tuple[torch.Tensor, FusionOutput]:
        """Logits ``(B, num_classes)`` and the fusion output for one collated batch."""
        features = self.encode_images(batch)
        text_hidden = self.text(batch["input_ids"], batch["attention_mask"])
        keep = self.ve_dropout(batch["input_ids"].shape[0])
        out = self.fusion(features, keep, text_hidden, batch["attention_mask"].bool(), output_attentions)
        return self.head(out.pooled), out

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        logits, _ = self(batch)
        loss = self.task.loss(logits, batch)
        size = batch["labels"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        # Every labelled example of the epoch, on every rank (unlabelled ones weigh nothing).
        hits = (logits.argmax(-1) == batch["labels"]).float()
        self.train_acc.update(hits, weight=(batch["labels"] >= 0).float())
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    # ---- evaluation ----------------------------------------------------------------------------
    def score_batch(
        self, batch: Mapping[str, Any], metric: Metric, loss_mean: MeanMetric, output_attentions: bool = False
    ) -> tuple[torch.Tensor, FusionOutput]:
        """Forward one batch, feed the task ``metric`` and the running mean loss ``loss_mean``; returns the logits
        ``(B, num_classes)`` and the fusion output.

        The one scoring step of evaluation (``validation_step`` / ``test_step``) and of the analysis modes
        (``fusion.analysis.common.evaluate``), so an analysis's unablated numbers are eval.py's. The task's loss
        is a mean over the batch's annotated examples, so it is weighted by their count: the split's loss is
        the mean over its annotated examples, however they fall into batches (a batch without any weighs 0).
        """
        logits, out = self(batch, output_attentions=output_attentions)
        self.task.update_metric(metric, logits, batch)
        loss_mean.update(self.task.loss(logits, batch).detach().float(), weight=annotated_count(batch))
        return logits, out

    def score_answers(
        self, batch: Mapping[str, Any], metric: Metric, loss_mean: MeanMetric, output_attentions: bool = False
    ) -> ScoredBatch:
        """:meth:`score_batch`, with each example's answer (the argmax entry of ``task.answers``)."""
        logits, out = self.score_batch(batch, metric, loss_mean, output_attentions=output_attentions)
        answers = self.task.answers
        return ScoredBatch([answers[i] for i in logits.argmax(-1).tolist()], logits, out)

    def attention_statistics(self) -> AttentionOverEncoders:
        fusion = self.fusion
        stats = AttentionOverEncoders(self.encoder_names, fusion.depth, fusion.num_heads, mixed=fusion.mixes_encoders)
        return stats.to(self.device)

    def update_attention_statistics(
        self, stats: Metric, scored: ScoredBatch, rows: torch.Tensor | None = None
    ) -> None:
        out: FusionOutput = scored.out
        if out.attentions is None:
            raise ValueError("no attention read-out: score the batch with output_attentions=True")
        if rows is None:
            stats.update(out.attentions, out.key_groups, out.text_query_mask)
        else:
            stats.update([a[rows] for a in out.attentions], out.key_groups, out.text_query_mask[rows])

    def eval_step(self, batch: Mapping[str, Any], stage: Stage) -> StepOutput:
        logits, out = self.score_batch(batch, self.metrics[stage], self.eval_loss[stage], self.attention_stats)
        if self.predictions_path is not None:
            self._prediction_rows.extend(self.task.prediction_rows(logits, batch))
        return {"fusion": out}
