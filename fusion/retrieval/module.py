"""The LightningModule for image-text retrieval: contrastive first stage + fusion-model re-ranking.

Training, per batch of matching (image, caption) pairs: the frozen features once; the first stage's
contrastive loss (ITC); image-text matching (ITM, the 2-class head on the fused [CLS]) on the positive
pairs plus one hard negative caption per image and one hard negative image per caption.

Evaluation (val/test): every unique image's encoder features and every caption's text states are kept
as the loader delivers them; at the epoch's end the first stage ranks all pairs, the top ``rerank_k`` of
each query (both directions) are re-scored by the fusion model's ITM log-odds, and
:class:`~fusion.metrics.ranking.RetrievalRecall` reports R@1/5/10 both ways and their sum (``<stage>/rsum``),
and the same for the first stage alone (``<stage>/first_rsum``, ``<stage>/first_t2i_r1``...).
Under DDP each process collects its share of the split; the shares are gathered (each image and caption
once) and every process ranks the whole split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion.encoders.text import TextEncoder
from fusion.encoders.vision import VisionEncoder
from fusion.metrics.ranking import PairScorer, RetrievalRecall, pessimistic_rank, rerank
from fusion.model.heads import ClassifierHead
from fusion.model.transformer import FusionModel, FusionOutput
from fusion.retrieval.dual_encoder import DualEncoder, contrastive_loss, hard_negatives, same_image
from fusion.tasks.base import VLTask
from fusion.training.module import FusionBase, Stage, StepOutput

TOP = 10  # candidates per query in the prediction file


@runtime_checkable
class RankingTask(Protocol):
    """A retrieval task: writes its official prediction file from the rankings of both directions."""

    def write_rankings(
        self, caption_ids: Sequence[str], text_to_image: Sequence[Sequence[str]], image_keys: Sequence[str],
        image_to_text: Sequence[Sequence[str]], path: Path,
    ) -> None:
        """Per caption its ranked image keys, per image its ranked caption ids -> the file at ``path``."""


@dataclass
class MatchingPairs:
    """The (image, caption) pairs a training step's matching loss trains on, indices into the batch: ``image_idx``
    (P,), ``text_idx`` (P,), ``labels`` (P,) long, 1 for the batch's B positive pairs (first), 0 for the hard
    negatives after them."""

    image_idx: Tensor
    text_idx: Tensor
    labels: Tensor


@dataclass
class Gallery:
    """What one evaluation epoch collects; tensors stay on the model's device.

    Images: ``image_keys`` (I), ``features[name]`` list of (n, N_e, D_e), ``image_embeds`` list of (n, E).
    Captions: ``caption_ids`` (T), ``caption_image`` (T) index into ``image_keys``, ``text_states`` list of
    (b, L_b, D_t), ``text_masks`` list of (b, L_b) bool, ``text_embeds`` list of (b, E); ``captions`` (T) the
    raw caption strings (what the LM head's prompt reads), when ``add_texts`` was given them (else empty).
    """

    image_keys: list[str] = field(default_factory=list)
    image_index: dict[str, int] = field(default_factory=dict)
    features: dict[str, list[Tensor]] = field(default_factory=dict)
    image_embeds: list[Tensor] = field(default_factory=list)
    caption_ids: list[str] = field(default_factory=list)
    caption_image: list[int] = field(default_factory=list)
    text_states: list[Tensor] = field(default_factory=list)
    text_masks: list[Tensor] = field(default_factory=list)
    text_embeds: list[Tensor] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)

    def add_images(self, keys: list[str], features: Mapping[str, Tensor], embeds: Tensor) -> None:
        for key in keys:
            self.image_index[key] = len(self.image_keys)
            self.image_keys.append(key)
        for name, f in features.items():
            self.features.setdefault(name, []).append(f)
        self.image_embeds.append(embeds)

    def add_texts(
        self, ids: list[str], image_keys: list[str], states: Tensor, mask: Tensor, embeds: Tensor,
        texts: Sequence[str] | None = None,
    ) -> None:
        if texts is not None and len(texts) != len(ids):
            raise ValueError(f"{len(texts)} caption texts for {len(ids)} captions")
        if self.caption_ids and (texts is not None) != bool(self.captions):
            raise ValueError("a gallery keeps the texts of all its captions or of none")
        if texts is not None:
            self.captions.extend(texts)
        self.caption_ids.extend(ids)
        self.caption_image.extend(self.image_index[k] for k in image_keys)
        self.text_states.append(states)
        self.text_masks.append(mask)
        self.text_embeds.append(embeds)

    def to(self, device: torch.device | str) -> Gallery:
        """The same gallery with every tensor on ``device``."""
        def moved(tensors: list[Tensor]) -> list[Tensor]:
            return [t.to(device) for t in tensors]

        return replace(
            self, features={n: moved(f) for n, f in self.features.items()}, image_embeds=moved(self.image_embeds),
            text_states=moved(self.text_states), text_masks=moved(self.text_masks), text_embeds=moved(self.text_embeds),
        )

    @staticmethod
    def merge(parts: list[Gallery]) -> Gallery:
        """One gallery from the galleries of several processes, each image and caption once (an image's captions
        are shared out to several processes, and a padding distributed sampler hands some examples to two)."""
        out = Gallery()
        seen: set[str] = set()
        for part in parts:
            if not part.caption_ids:
                continue
            features, image_emb, states, masks, text_emb = part.stacked()
            new = [i for i, key in enumerate(part.image_keys) if key not in out.image_index]
            if new:
                at = torch.tensor(new)
                keys = [part.image_keys[i] for i in new]
                out.add_images(keys, {n: f[at] for n, f in features.items()}, image_emb[at])
            keep = []
            for t, caption in enumerate(part.caption_ids):
                if caption not in seen:
                    seen.add(caption)
                    keep.append(t)
            if keep:
                at = torch.tensor(keep)
                out.add_texts(
                    [part.caption_ids[t] for t in keep], [part.image_keys[part.caption_image[t]] for t in keep],
                    states[at], masks[at], text_emb[at], [part.captions[t] for t in keep] if part.captions else None,
                )
        return out

    def stacked(self) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, Tensor]:
        """``features`` {name: (I, N_e, D_e)}, image embeds (I, E), text states (T, L, D_t) padded to the
        longest caption, masks (T, L), text embeds (T, E)."""
        features = {n: torch.cat(f) for n, f in self.features.items()}
        length = max(s.shape[1] for s in self.text_states)
        states = torch.cat([F.pad(s, (0, 0, 0, length - s.shape[1])) for s in self.text_states])
        masks = torch.cat([F.pad(m, (0, length - m.shape[1])) for m in self.text_masks])
        return features, torch.cat(self.image_embeds), states, masks, torch.cat(self.text_embeds)


class RetrievalLitModule(FusionBase):
    """The fusion model trained for image-text matching, evaluated by re-ranking (a sibling of the classification
    :class:`~fusion.training.module.FusionLitModule` on their common :class:`~fusion.training.module.FusionBase`).

    ``embed_dim`` / ``temperature``: the first stage (:class:`~fusion.retrieval.dual_encoder.DualEncoder`);
    ``itc_weight`` / ``itm_weight``: the two losses; ``hardest_negatives``: the most similar wrong pair
    instead of a draw; ``rerank_k``: candidates per query re-scored by the fusion model;
    ``rerank_batch_size``: pairs per fusion forward when re-scoring. Everything else as the base class
    (encoders, VE-dropout, ``drop_encoders``, optimiser, checkpoints); the task's head has two classes
    (no match, match).
    """

    def __init__(
        self,
        encoders: Mapping[str, VisionEncoder],
        text: TextEncoder,
        task: VLTask,
        fusion: Callable[..., FusionModel] = FusionModel,
        head: Callable[..., nn.Module] = ClassifierHead,
        embed_dim: int = 256,
        temperature: float = 0.07,
        itc_weight: float = 1.0,
        itm_weight: float = 1.0,
        hardest_negatives: bool = False,
        rerank_k: int = 128,
        rerank_batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(encoders, text, task, fusion=fusion, head=head, **kwargs)
        if self.task.num_classes != 2:
            raise ValueError(
                f"retrieval trains a 2-class matching head, but task {self.task.name!r} has "
                f"{self.task.num_classes} answers; use a retrieval task (e.g. +experiment=flickr30k)"
            )
        if not isinstance(task, RankingTask):
            raise TypeError(f"task {task.name!r} has no write_rankings(): retrieval needs a ranking task (flickr30k)")
        if int(rerank_k) < 1 or int(rerank_batch_size) < 1:
            raise ValueError(
                f"training.rerank_k ({rerank_k}) and training.rerank_batch_size ({rerank_batch_size}) must be >= 1"
            )
        self.first_stage = DualEncoder(
            {n: e.embed_dim for n, e in self.encoders.items()},
            self.text.hidden_size,
            embed_dim=embed_dim,
            temperature=temperature,
            encoder_prefix={n: e.num_prefix_tokens for n, e in self.encoders.items()},
        )
        self.itc_weight, self.itm_weight = float(itc_weight), float(itm_weight)
        self.hardest_negatives = bool(hardest_negatives)
        self.rerank_k = int(rerank_k)
        self.rerank_batch_size = int(rerank_batch_size)
        self.first_metrics = nn.ModuleDict({stage: RetrievalRecall() for stage in ("val", "test")})
        self._galleries: dict[str, Gallery] = {}

    # ---- the two scores ------------------------------------------------------------------------
    def itm_logits(
        self,
        features: Mapping[str, Tensor],
        image_idx: Tensor,
        text_states: Tensor,
        text_mask: Tensor,
        text_idx: Tensor,
        output_attentions: bool = False,
    ) -> tuple[Tensor, FusionOutput]:
        """Matching logits (P, 2) of the pairs (image ``image_idx[p]``, caption ``text_idx[p]``).

        ``features[name]`` (n_images, N_e, D_e); ``text_states`` (n_texts, L, D_t); ``text_mask`` (n_texts, L).
        """
        feats = {name: f[image_idx] for name, f in features.items()}
        mask = text_mask[text_idx].bool()
        keep = self.ve_dropout(len(image_idx))
        out = self.fusion(feats, keep, text_states[text_idx], mask, output_attentions)
        # The head in float32 even under autocast: bf16 logits would make ties among re-ranked candidates.
        with torch.autocast(device_type=out.pooled.device.type, enabled=False):
            return self.head(out.pooled.float()), out

    def pair_scorer(
        self, features: Mapping[str, Tensor], text_states: Tensor, text_mask: Tensor, captions: Sequence[str] = ()
    ) -> PairScorer:
        """ITM log-odds (logit match - logit no match) of (text, image) index pairs, in fixed-size chunks.

        ``captions``: the gallery's raw caption strings, for scorers that read the text itself (the LM head's,
        :class:`~fusion.retrieval.lm_module.RetrievalLMLitModule`); the fusion model reads ``text_states``.
        """

        def score(t: Tensor, i: Tensor, length: int) -> Tensor:
            logits, _ = self.itm_logits(features, i, text_states[:, :length], text_mask[:, :length], t)
            return logits[:, 1] - logits[:, 0]

        return self.chunked(score, text_mask)

    def chunked(self, score: Callable[[Tensor, Tensor, int], Tensor], text_mask: Tensor) -> PairScorer:
        """A scorer of (text, image) index pairs that calls ``score(t, i, length)`` on ``rerank_batch_size`` pairs
        at a time, without gradients; ``length``: the chunk's longest caption (the text columns past it are
        padding for every caption of the chunk, ``text_mask`` (T, L))."""

        @torch.no_grad()
        def scorer(t_idx: Tensor, i_idx: Tensor) -> Tensor:
            out = []
            for start in range(0, len(t_idx), self.rerank_batch_size):
                t, i = t_idx[start : start + self.rerank_batch_size], i_idx[start : start + self.rerank_batch_size]
                out.append(score(t, i, int(text_mask[t].sum(dim=1).max())))
            return torch.cat(out) if out else torch.zeros(0, device=text_mask.device)

        return scorer

    # ---- training ------------------------------------------------------------------------------
    def contrastive_step(
        self, batch: Mapping[str, Any]
    ) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, MatchingPairs]:
        """The first stage's part of a training step: the batch's frozen features, text states (B, L, D_t) and
        mask (B, L), the contrastive loss (ITC), and the pairs the matching loss trains on (each positive pair,
        one hard negative caption per image and one hard negative image per caption, mined from the first
        stage's similarities)."""
        features = self.encode_images(batch)
        states = self.text(batch["input_ids"], batch["attention_mask"])
        mask = batch["attention_mask"].bool()
        B = mask.shape[0]
        image_emb = self.first_stage.embed_images(features, self.ve_dropout(B))
        text_emb = self.first_stage.embed_text(states, mask)
        logits = self.first_stage.scale * text_emb @ image_emb.T  # (B captions, B images)
        positives = same_image(batch["image_keys"], device=logits.device)
        itc = contrastive_loss(logits, positives)

        neg_image, neg_text = hard_negatives(logits, positives, hardest=self.hardest_negatives)
        rows = torch.arange(B, device=logits.device)
        has_image, has_text = neg_image >= 0, neg_text >= 0
        image_idx = torch.cat([rows, neg_image[has_image], rows[has_text]])
        text_idx = torch.cat([rows, rows[has_image], neg_text[has_text]])
        labels = (torch.arange(len(image_idx), device=logits.device) < B).long()  # positives first
        return features, states, mask, itc, MatchingPairs(image_idx, text_idx, labels)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        features, states, mask, itc, pairs = self.contrastive_step(batch)
        B, labels = mask.shape[0], pairs.labels
        itm_out, _ = self.itm_logits(features, pairs.image_idx, states, mask, pairs.text_idx)
        itm = F.cross_entropy(itm_out, labels)

        loss = self.itc_weight * itc + self.itm_weight * itm
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log_dict({"train/itc": itc, "train/itm": itm}, batch_size=B)
        acc = (itm_out.argmax(-1) == labels).float().mean()
        self.log("train/acc", acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=B)
        return loss

    # ---- evaluation ----------------------------------------------------------------------------
    def start_eval(self, stage: Stage) -> None:
        self._galleries[stage] = Gallery()

    def _gather(self, gallery: Gallery) -> Gallery:
        """Every process's gallery, merged (each process then ranks the whole split); as is in one process."""
        if self.trainer.world_size == 1:
            return gallery
        parts: list[Gallery | None] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(parts, gallery.to("cpu"))
        return Gallery.merge([p for p in parts if p is not None]).to(self.device)

    def eval_step(self, batch: Mapping[str, Any], stage: Stage) -> StepOutput | None:
        gallery = self._galleries[stage]
        keys: list[str] = batch["image_keys"]
        unique = list(dict.fromkeys(keys))
        rows = torch.tensor([keys.index(k) for k in unique], device=batch["input_ids"].device)
        # Each image once (a split lists it once per caption): pixels or cached features of those rows only.
        features = self.encode_images(
            {part: {n: t[rows] for n, t in batch[part].items()} for part in ("images", "features") if batch.get(part)}
        )
        image_emb = self.first_stage.embed_images(features, self.ve_dropout(len(unique)))
        new = [j for j, k in enumerate(unique) if k not in gallery.image_index]
        if new:
            at = torch.tensor(new, device=rows.device)
            gallery.add_images([unique[j] for j in new], {n: f[at] for n, f in features.items()}, image_emb[at])
        states = self.text(batch["input_ids"], batch["attention_mask"])
        mask = batch["attention_mask"].bool()
        gallery.add_texts(
            list(batch["question_ids"]), keys, states, mask, self.first_stage.embed_text(states, mask),
            list(batch["questions"]),
        )
        if not (self.attention_stats or self.fusion.reports_encoder_weights):
            return None
        # The statistics callbacks describe the matching pairs of the split, as for the other tasks.
        image_idx = torch.tensor([unique.index(k) for k in keys], device=rows.device)
        return self.matching_statistics(batch, features, image_idx, states, mask)

    def matching_statistics(
        self, batch: Mapping[str, Any], features: Mapping[str, Tensor], image_idx: Tensor, states: Tensor,
        mask: Tensor,
    ) -> StepOutput:
        """What the statistics callbacks read for an evaluation batch's matching pairs (caption b with image
        ``image_idx[b]`` of ``features``): the fusion model's output, with attentions under ``attention_stats``."""
        text_idx = torch.arange(len(image_idx), device=image_idx.device)
        _, out = self.itm_logits(features, image_idx, states, mask, text_idx, self.attention_stats)
        return {"fusion": out}

    def end_eval(self, stage: Stage) -> None:
        gallery = self._galleries.pop(stage, None)
        if gallery is None:
            return
        gallery = self._gather(gallery)
        if not gallery.caption_ids:
            return
        features, image_emb, states, masks, text_emb = gallery.stacked()
        first = text_emb.float() @ image_emb.float().T  # (T, I) cosine similarity
        caption_image = torch.tensor(gallery.caption_image, device=first.device)
        positives = caption_image[:, None] == torch.arange(first.shape[1], device=first.device)[None, :]
        # The eval steps' precision context (e.g. bf16 autocast): the stored states were made under it.
        plugin = self.trainer.precision_plugin
        with plugin.val_step_context() if stage == "val" else plugin.test_step_context():
            scorer = self.pair_scorer(features, states, masks, gallery.captions)
            result = rerank(first, positives, self.rerank_k, scorer, top=TOP)
        # The re-ranked recalls (headline), and the first stage's alone: what re-ranking adds.
        first_t2i, first_i2t = pessimistic_rank(first, positives), pessimistic_rank(first.T, positives.T)
        for metric, t2i, i2t, prefix in (
            (self.metrics[stage], result.t2i_ranks, result.i2t_ranks, ""),
            (self.first_metrics[stage], first_t2i, first_i2t, "first_"),
        ):
            metric.update("t2i", t2i)
            metric.update("i2t", i2t)
            values = metric.compute()  # {"": rsum, "t2i_r1": ..., "i2t_r10": ...}
            metric.reset()
            headline = f"{stage}/{prefix}{self.task.metric_name}"
            self.log(headline, values.pop(""), prog_bar=stage == "val" and not prefix)
            self.log_dict({f"{stage}/{prefix}{name}": value for name, value in values.items()})
        if self.predictions_path is not None and not self.trainer.sanity_checking and self.trainer.is_global_zero:
            self.task.write_rankings(
                gallery.caption_ids,
                [[gallery.image_keys[j] for j in row] for row in result.t2i_top.tolist()],
                gallery.image_keys,
                [[gallery.caption_ids[j] for j in row] for row in result.i2t_top.tolist()],
                self.predictions_path,
            )
