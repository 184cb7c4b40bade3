"""What every analysis mode shares: loading a checkpoint, the evaluation loop, input ablations, the report.

An analysis runs on the model :func:`fusion.run.commands.build` makes from the run's config, with the checkpoint's
weights loaded through the module's own ``on_load_checkpoint`` (encoder fingerprints and answer vocabulary
are checked as in ``eval.py``): the classifier (``FusionLitModule``) or the LM head (``LMLitModule``,
``training=lm``). The loop :func:`evaluate` scores the split's batches with the module's
:meth:`~fusion.training.module.TaskModule.score_answers`, its evaluation step (the attention read-out is the
model's own ``output_attentions``; the LM head generates or ranks its answers as eval.py does); modes change
what goes in (which encoders are kept, which features or tokens, which question) through the batch or the
VE-dropout module, never through a second copy of the model. With the LM head, a dropped encoder's visual
tokens leave the LM's input (``FusedTokens.visible``).

The model and every batch (cached features, images, token ids, labels: :func:`move_batch`) live on
``analysis.device`` (:func:`resolve_device`; default the trainer's accelerator when CUDA is there), and every
tensor a mode makes is made on the model's device.

Every mode writes a report folder (``analysis.dir``, default ``<run folder>/<mode>``) through
:class:`~fusion.analysis.report.Report` (:func:`new_report`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger
from torch import nn
from torchmetrics import MeanMetric

from fusion.analysis.report import Report
from fusion.data.module import FusionDataModule
from fusion.model.dropout import EncoderDropout
from fusion.run.commands import build
from fusion.run.context import open_run
from fusion.tasks.base import Example, VLTask
from fusion.training.module import FusionBase, ScoredBatch, TaskModule
from fusion.training.resume import load_checkpoint

log = logging.getLogger(__name__)

Batch = dict[str, Any]


@dataclass
class AnalysisContext:
    """A loaded checkpoint and the split a mode analyses; ``settings`` is the mode's part of ``cfg.analysis``."""

    cfg: DictConfig
    mode: str
    model: TaskModule
    datamodule: FusionDataModule
    split: str
    out_dir: Path
    loggers: list[Logger]
    settings: DictConfig
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def task(self) -> VLTask:
        return self.model.task

    @property
    def encoder_names(self) -> list[str]:
        return list(self.model.encoder_names)

    @property
    def lm(self) -> bool:
        """Whether the model answers with the LM head (``training=lm``) rather than the classifier."""
        from fusion.training.lm_module import LMLitModule

        return isinstance(self.model, LMLitModule)

    def batches(self, split: str | None = None, max_batches: int | None = None) -> Iterator[Batch]:
        """The batches of ``split`` (default: the analysed one), at most ``analysis.max_batches`` of them, on the
        model's device (cached features, images, token ids, labels; floating-point tensors in its dtype)."""
        self.datamodule.val_split = split or self.split
        limit = max_batches if max_batches is not None else self.cfg.analysis.get("max_batches")
        loader = self.datamodule.val_dataloader()
        return (move_batch(b, self.device, self.model.dtype) for b in itertools.islice(iter(loader), limit))


def move_batch(batch: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """``batch`` with every tensor inside it (dicts, lists and tuples, nested) on ``device``; floating-point
    tensors also cast to ``dtype`` when given (token ids, labels and masks keep theirs). Other values as they are."""

    def move(tensor: torch.Tensor) -> torch.Tensor:
        cast = dtype if dtype is not None and tensor.is_floating_point() else None
        return tensor.to(device=device, dtype=cast)

    return apply_to_collection(batch, torch.Tensor, move)


DEVICES = "cpu, cuda, cuda:<index>, or null (cuda if trainer.accelerator is gpu/cuda/auto and CUDA is available)"


def resolve_device(cfg: DictConfig) -> torch.device:
    """Where an analysis runs: ``analysis.device``, or (null) the trainer's accelerator when CUDA is available."""
    analysis = cfg.get("analysis") or OmegaConf.create({})
    choice = analysis.get("device")
    if choice is None:
        accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu") or "cpu").lower()
        cuda = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        return torch.device("cuda" if cuda else "cpu")
    try:
        device = torch.device(str(choice))
    except (RuntimeError, ValueError):
        raise ValueError(f"analysis.device={choice!r} is not a device; allowed: {DEVICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"analysis.device={choice!r}: the analysis modes run on cpu or cuda; allowed: {DEVICES}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"analysis.device={choice!r} but CUDA is not available on this machine "
                             "(torch.cuda.is_available() is False); use analysis.device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"analysis.device={choice!r} but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    return device


def load_weights(model: FusionBase, ckpt_path: str | Path) -> None:
    """Load a training checkpoint into ``model`` the way Lightning does (``on_load_checkpoint``, then the state)."""
    checkpoint = torch.load(str(ckpt_path), map_location="cpu", weights_only=True)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])


@contextlib.contextmanager
def open_analysis(cfg: DictConfig, mode: str) -> Iterator[AnalysisContext]:
    """Open the run (:func:`fusion.run.context.open_run`: seed, record, loggers closed afterwards), build data and
    model from ``cfg`` and load ``cfg.ckpt_path``."""
    if cfg.get("ckpt_path") is None:
        raise ValueError(f"eval.py mode={mode} needs ckpt_path=<a checkpoint>, e.g. <run>/checkpoints/last.ckpt")
    ckpt = Path(str(cfg.ckpt_path)).expanduser()
    load_checkpoint(ckpt)  # a file that is not a checkpoint is named (path, what it is) before anything runs
    analysis = cfg.get("analysis") or OmegaConf.create({})
    device = resolve_device(cfg)  # before building anything: a wrong device fails at once
    if analysis.get("num_threads"):
        # Many small forward passes (causal tracing runs ~150 per batch): on a busy CPU every op of a
        # multi-threaded pass waits for a descheduled thread.
        torch.set_num_threads(int(analysis.num_threads))
    # Seeded, recorded (never over a training run folder's record), loggers closed: as every run.
    with open_run(cfg, mode) as run:
        datamodule, model = build(cfg)
        from fusion.retrieval.module import RetrievalLitModule  # here: only this check needs the retrieval code

        if isinstance(model, RetrievalLitModule):
            raise ValueError(f"eval.py mode={mode} analyses classification tasks; retrieval ({model.task.name}) is "
                             "not supported (its scores are rankings over a gallery, not a head's answer)")
        load_weights(model, ckpt)
        # Evaluation behaviour everywhere: dropout off, VE-dropout only through what a mode sets.
        model.to(device).eval()
        log.info("analysis on %s", device)
        split = str(cfg.split)
        model.task.check_split(split)
        datamodule.prepare_data()
        datamodule.setup("validate")
        out_dir = Path(str(analysis.get("dir") or run.output_dir / mode))
        out_dir.mkdir(parents=True, exist_ok=True)
        loggers = run.start_loggers()
        settings = analysis.get(mode) or OmegaConf.create({})
        with torch.no_grad():
            yield AnalysisContext(cfg, mode, model, datamodule, split, out_dir, loggers, settings, device)


# ---- which encoders the model sees --------------------------------------------------------------------


@contextlib.contextmanager
def keep_only(model: FusionBase, kept: Sequence[str]) -> Iterator[None]:
    """Evaluate with only the encoders ``kept``: VE-dropout's ``drop_encoders`` names the others for every sample."""
    dropped = [n for n in model.encoder_names if n not in kept]
    saved = model.ve_dropout
    model.ve_dropout = EncoderDropout(model.encoder_names, drop_encoders=dropped).to(model.device).eval()
    try:
        yield
    finally:
        model.ve_dropout = saved


class _RandomKeep(nn.Module):
    """A VE-dropout stand-in giving each sample a random non-empty subset, uniformly; ``last`` (B, n) holds it."""

    def __init__(self, num_encoders: int, generator: torch.Generator, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.num_encoders, self.generator, self.device = num_encoders, generator, torch.device(device)
        self.last: torch.Tensor | None = None

    def forward(self, batch_size: int) -> torch.Tensor:
        # Subset codes 1..2^n-1, one bit per encoder: every non-empty subset equally likely. Drawn on the CPU
        # (the same subsets on every device), then moved to the model's.
        codes = torch.randint(1, 2**self.num_encoders, (batch_size,), generator=self.generator)
        self.last = ((codes[:, None] >> torch.arange(self.num_encoders)) & 1 == 1).to(self.device)
        return self.last


@contextlib.contextmanager
def random_subsets(model: FusionBase, seed: int = 0) -> Iterator[_RandomKeep]:
    """Each sample sees a random non-empty subset of the encoders; the yielded module's ``last`` says which."""
    saved = model.ve_dropout
    model.ve_dropout = _RandomKeep(len(model.encoder_names), torch.Generator().manual_seed(seed), model.device)
    try:
        yield model.ve_dropout
    finally:
        model.ve_dropout = saved


def subsets(names: Sequence[str]) -> list[tuple[str, ...]]:
    """All non-empty subsets of ``names``, smallest first, each in ``names`` order."""
    return [c for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]


# ---- input ablations --------------------------------------------------------------------------------


def with_features(model: FusionBase, batch: Batch, replace: Mapping[str, torch.Tensor]) -> Batch:
    """``batch`` with the features of the encoders in ``replace`` set to the given token (D_e,) at every position.

    The model reads ``batch["features"]`` before running an encoder (the feature-cache path of
    ``encode_images``), so the other encoders still run on the pixels, and the sequence keeps its layout.
    """
    features = dict(batch.get("features") or {})
    size = batch["input_ids"].shape[0]
    images = model.task.images_per_example
    for name, token in replace.items():
        encoder = model.encoders[name]
        shape = (size, encoder.num_tokens, encoder.embed_dim)
        if images > 1:
            shape = (size, images, encoder.num_tokens, encoder.embed_dim)
        features[name] = token.to(device=model.device, dtype=model.dtype).expand(shape).contiguous()
    return {**batch, "features": features}


def mean_tokens(ctx: AnalysisContext) -> dict[str, torch.Tensor]:
    """Each encoder's dataset-mean token (D_e,) over every token of every image of the analysed split."""
    sums: dict[str, torch.Tensor] = {}
    count: dict[str, int] = defaultdict(int)
    for batch in ctx.batches():
        for name, f in ctx.model.encode_images(batch).items():
            flat = f.reshape(-1, f.shape[-1]).double()
            sums[name] = sums.get(name, 0) + flat.sum(0)
            count[name] += flat.shape[0]
    return {name: (s / count[name]).float() for name, s in sums.items()}


def mask_text(batch: Batch, mask_id: int, special_ids: Sequence[int]) -> Batch:
    """``batch`` with every real text token except the special ones ([CLS], [SEP]) replaced by ``mask_id``."""
    ids = batch["input_ids"]
    special = torch.tensor(list(special_ids), dtype=ids.dtype, device=ids.device)
    real = batch["attention_mask"].bool() & ~torch.isin(ids, special)
    return {**batch, "input_ids": torch.where(real, torch.full_like(ids, mask_id), ids)}


# ---- the evaluation loop ------------------------------------------------------------------------------


def metric_values(task: VLTask, computed: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``task.metric().compute()`` as ``{"acc": ..., "acc_color": ...}`` (headline named by ``task.metric_name``)."""
    name = task.metric_name
    return {name + (f"_{k}" if k else ""): float(v) for k, v in computed.items()}


def evaluate(
    ctx: AnalysisContext,
    transform: Callable[[Batch], Batch] | None = None,
    on_output: Callable[[Batch, ScoredBatch], None] | None = None,
    output_attentions: bool = False,
    split: str | None = None,
) -> dict[str, float]:
    """The task metric and mean loss of the model on a split, scored by the module's ``score_answers`` (the
    step ``eval.py`` evaluates with: unablated, the same numbers as its metrics.json).

    ``transform`` changes each batch before the forward pass (an ablation); ``on_output(batch, scored)`` sees
    every scored batch (:class:`~fusion.training.module.ScoredBatch`: each example's answer, the logits where
    the head ranks the answers, the forward output for statistics). Returns the metric values plus ``loss``
    (mean over annotated examples; NaN on a split without any) and ``n`` (examples).
    """
    model = ctx.model
    # Fresh states beside the logits, as the module's own val/test metrics.
    metric = ctx.task.metric().to(model.device)
    loss_mean = MeanMetric(nan_strategy="ignore").to(model.device)
    n = 0
    for batch in ctx.batches(split):
        if transform is not None:
            batch = transform(batch)
        scored = model.score_answers(batch, metric, loss_mean, output_attentions=output_attentions)
        n += len(scored.answers)
        if on_output is not None:
            on_output(batch, scored)
    values = metric_values(ctx.task, metric.compute())
    values["loss"] = float(loss_mean.compute())
    values["n"] = float(n)
    return values


def answer_index(task: VLTask) -> dict[str, int]:
    """Answer string -> its (first) index in ``task.answers``."""
    index: dict[str, int] = {}
    for i, answer in enumerate(task.answers):
        index.setdefault(answer, i)
    return index


def answer_score(task: VLTask, example: Example, answer: str, index: Mapping[str, int]) -> float | None:
    """The task metric's score of the answer string ``answer`` for ``example`` (None if it is not scored): an
    entry of ``task.answers`` (``index``: :func:`answer_index`) by
    :meth:`~fusion.tasks.base.VLTask.answer_accuracy`, any other string (an LM head's generated answer) by the
    task's metric fed that one example (``update_metric_text``, as evaluation scores generated answers)."""
    if task.answer_accuracy(example, 0) is None:
        return None
    if answer in index:
        return task.answer_accuracy(example, index[answer])
    metric = task.metric()
    types = task.answer_types
    batch = {
        "question_ids": [example.question_id],
        "labels": torch.tensor([example.label]),
        "answer_types": torch.tensor([types.index(example.answer_type) if example.answer_type in types else 0]),
    }
    task.update_metric_text(metric, [answer], batch)
    return float(metric.compute()[""])


def question_prior_accuracy(task: VLTask, split: str) -> float | None:
    """Accuracy of a text-only baseline that never looks at the image: each question's most frequent training
    answer (a question not seen in training: its answer type's, else the overall most frequent answer)."""
    train = [e for e in task.examples(task.train_split) if e.label >= 0]
    # Scored by the task's own metric (VQA: the official accuracy of the guess against the ten answers).
    target = [e for e in task.examples(split) if task.answer_accuracy(e, 0) is not None]
    if not train or not target:
        return None
    by_question: dict[str, Counter[int]] = defaultdict(Counter)
    by_type: dict[str, Counter[int]] = defaultdict(Counter)
    for e in train:
        by_question[e.question][e.label] += 1
        by_type[e.answer_type][e.label] += 1
    overall = Counter(e.label for e in train).most_common(1)[0][0]

    def guess(question: str, answer_type: str) -> int:
        for counts in (by_question.get(question), by_type.get(answer_type)):
            if counts:
                return counts.most_common(1)[0][0]
        return overall

    return sum(task.answer_accuracy(e, guess(e.question, e.answer_type)) for e in target) / len(target)


# ---- the report folder --------------------------------------------------------------------------------


def new_report(ctx: AnalysisContext, title: str) -> Report:
    """A report for ``ctx``'s mode, headed with what was analysed."""
    report = Report(ctx.out_dir, title, ctx.loggers, key=f"analysis/{ctx.mode}")
    report.results.update(
        {
            "mode": ctx.mode,
            "ckpt_path": str(ctx.cfg.ckpt_path),
            "split": ctx.split,
            "task": ctx.task.name,
            "metric": ctx.task.metric_name,
            "encoders": ctx.encoder_names,
        }
    )
    report.text(
        f"Checkpoint `{ctx.cfg.ckpt_path}`, task `{ctx.task.name}`, split `{ctx.split}`, encoders "
        + ", ".join(f"`{n}`" for n in ctx.encoder_names)
        + "."
    )
    return report
