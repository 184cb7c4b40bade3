"""The LM-head LightningModule (``training=lm``): frozen encoders -> a fuser's visual tokens -> projector -> a
pretrained causal LM (:class:`fusion.model.lm.LMHead`), trained on the answer's tokens.

Answers are scored by the task's official metric, as with the classifier:

- open-ended tasks (``task.open_ended``: VQAv2, OK-VQA, GQA, shapes) generate greedily; the string is the
  prediction (:meth:`~fusion.tasks.base.VLTask.update_metric_text`, the same prediction files);
- closed-set tasks (NLVR, NLVR2, SNLI-VE, Hateful Memes) rank their answers by log-likelihood under the LM
  (rank classification): the ``(B, C)`` log-likelihoods are the logits the classifier path scores, and their
  softmax the class probabilities AUROC reads.

Checkpoints hold the trainable weights only (projector, fuser, adapters; the LM too under ``regime=full``)
and the LM's fingerprint; loading with another LM is refused naming what differs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from fusion.fusers.base import FusedTokens
from fusion.fusers.groups import LM_RESERVED_NAMES
from fusion.model.lm import LMHead, LMHeadOutput, check_lm_fingerprint, template_fields
from fusion.model.transformer import FusionModel
from fusion.training.module import Stage, TaskModule, annotated_count

log = logging.getLogger(__name__)

HEAD_PREFIX = "head."
# The example fields a prompt template may use (the collated batch's raw text).
PROMPT_FIELDS = ("question",)
LMStepOutput = dict[str, Any]  # {"lm": LMHeadOutput | None, "fused": FusedTokens}, read by the statistics callbacks


class LMLitModule(TaskModule):
    """Frozen encoders, a fuser and a pretrained causal LM answering in words.

    Takes :class:`~fusion.training.module.FusionBase`'s arguments; ``head`` is an
    :class:`~fusion.model.lm.LMHead` partial (``conf/training/lm.yaml``: LM, regime, prompt template). The
    ``fusion`` config's fuser and width are used, its transformer is not (built with depth 0).
    ``max_new_tokens``: the generation budget of open-ended tasks. ``candidate_reduction``: how rank
    classification sums a candidate's token log-probabilities (``"sum"``, or ``"mean"`` per token).
    ``answer_words``: what the LM says for a closed-set task's answers (e.g. ``{hateful: "yes", not_hateful:
    "no"}``), the words it is trained on and ranks; answers not named are said as they are.
    """

    def __init__(
        self,
        *args: Any,
        max_new_tokens: int = 10,
        candidate_reduction: Literal["sum", "mean"] = "sum",
        answer_words: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        # Only the fuser's tokens reach the LM: no transformer blocks to build (or to leave without gradients).
        kwargs["fusion"] = partial(kwargs.get("fusion", FusionModel), depth=0)
        super().__init__(*args, **kwargs)
        if max_new_tokens < 1:
            raise ValueError(f"training.max_new_tokens must be at least 1, got {max_new_tokens}")
        if candidate_reduction not in ("sum", "mean"):
            raise ValueError(f"training.candidate_reduction must be 'sum' or 'mean', got {candidate_reduction!r}")
        self.max_new_tokens, self.candidate_reduction = int(max_new_tokens), candidate_reduction
        self.answer_words = self._checked_words(answer_words)
        reserved = sorted(set(self.encoder_names) & set(LM_RESERVED_NAMES))
        if reserved:
            raise ValueError(f"encoder name(s) {reserved} are reserved for token groups with the LM head; rename them")
        unknown = sorted(set(template_fields(self.head.prompt_template)) - set(PROMPT_FIELDS))
        if unknown:
            raise ValueError(
                f"training.head.prompt_template {self.head.prompt_template!r} uses field(s) {unknown}; an example "
                f"gives {list(PROMPT_FIELDS)}"
            )
        # Parts of the fusion model the LM does not read stay frozen: [CLS] and the final norm (no transformer),
        # and the text projection when the fuser ignores the text (every fuser but gated).
        unused: list[nn.Module | nn.Parameter] = [self.fusion.cls_token, self.fusion.norm]
        if not self.fusion.fuser.uses_text:
            unused += [self.fusion.text_proj, self.fusion.text_type]
        for part in unused:
            part.requires_grad_(False)

    def _checked_words(self, words: Mapping[str, str] | None) -> list[str]:
        """The word said for each of the task's answers (``answer_words`` checked: the task's answers as keys,
        distinct words; closed-set tasks only: a generated word could not be mapped back)."""
        answers = list(self.task.answers)
        if not words:
            return answers
        if self.task.open_ended:
            raise ValueError(
                f"training.answer_words is for closed-set tasks; task {self.task.name!r} generates its answers"
            )
        unknown = sorted(set(words) - set(answers))
        if unknown:
            raise ValueError(
                f"training.answer_words names {unknown}, not answers of task {self.task.name!r}: {answers}"
            )
        said = [str(words.get(a, a)) for a in answers]
        if len(set(said)) != len(said):
            pairs = dict(zip(answers, said, strict=True))
            raise ValueError(f"training.answer_words gives two answers the same word: {pairs}")
        return said

    def build_head(self, head: Callable[..., nn.Module]) -> nn.Module:
        """The LM head on the fuser's token width."""
        built = head(width=self.fusion.width)
        if not isinstance(built, LMHead):
            raise TypeError(f"training=lm needs an LMHead (fusion.model.lm.LMHead) as training.head, got {type(built)}")
        return built

    # ---- what the statistics callbacks read ------------------------------------------------------
    @property
    def lm_attention_shape(self) -> tuple[int, int]:
        """(layers, heads) of the LM's attention: the shape of its attention-over-encoder statistics."""
        config = self.head.base_lm.config.get_text_config()
        return int(config.num_hidden_layers), int(config.num_attention_heads)

    @property
    def mixes_encoders(self) -> bool:
        return self.fusion.mixes_encoders

    @property
    def reports_encoder_weights(self) -> bool:
        return self.fusion.reports_encoder_weights

    # ---- forward -------------------------------------------------------------------------------
    def fused_tokens(self, batch: Mapping[str, Any]) -> FusedTokens:
        """The fuser's visual tokens of one batch (``tokens`` (B, N, width)), VE-dropout applied (``visible``)."""
        features = self.encode_images(batch)
        B = len(batch["questions"])
        keep = self.ve_dropout(B)
        if self.fusion.fuser.uses_text:
            text_hidden, text_mask = self.text(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"]
        else:  # the fuser ignores the text: no text-encoder pass
            text_hidden = torch.zeros(B, 1, self.text.hidden_size, device=self.device, dtype=self.dtype)
            text_mask = torch.zeros(B, 1, dtype=torch.bool, device=self.device)
        fused, _ = self.fusion.visual_tokens(features, keep, text_hidden, text_mask)
        return fused

    def prompts(self, batch: Mapping[str, Any]) -> list[str]:
        return self.head.prompts([{"question": q} for q in batch["questions"]])

    def answer_strings(self, batch: Mapping[str, Any]) -> list[str | None]:
        """Each example's target answer (the word said for its label's answer), None where it has no label."""
        answers = self.answer_words
        return [answers[i] if i >= 0 else None for i in batch["labels"].tolist()]

    def forward(
        self, batch: Mapping[str, Any], output_attentions: bool = False, output_hidden_states: bool = False
    ) -> tuple[LMHeadOutput | None, FusedTokens]:
        """Teacher-forced pass over the batch's labelled examples (``loss``: the mean over their answer tokens);
        the LM output is None when no example has a label. A batch without labels in part is cut to its
        labelled rows (``LMHeadOutput`` rows follow them)."""
        fused = self.fused_tokens(batch)
        prompts, answers = self.prompts(batch), self.answer_strings(batch)
        rows = [i for i, a in enumerate(answers) if a is not None]
        if not rows:
            return None, fused
        sub = fused if len(rows) == len(answers) else _select(fused, rows)
        out = self.head(
            sub, [prompts[i] for i in rows], [answers[i] for i in rows], output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return out, fused

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        out, fused = self(batch)
        if out is None or out.loss is None:  # nothing to learn from: a zero that keeps the graph
            return fused.tokens.sum() * 0.0
        self.log("train/loss", out.loss, prog_bar=True, batch_size=annotated_count(batch))
        return out.loss

    # ---- evaluation ----------------------------------------------------------------------------
    def answer(self, batch: Mapping[str, Any], fused: FusedTokens, metric: Any) -> None:
        """Answer every example and feed ``metric`` (and eval.py's prediction rows): generation for open-ended
        tasks, rank classification over the task's answers otherwise."""
        prompts = self.prompts(batch)
        if self.task.open_ended:
            texts = self.head.generate(fused, prompts, self.max_new_tokens)
            self.task.update_metric_text(metric, texts, batch)
            if self.predictions_path is not None:
                self._prediction_rows.extend(self.task.prediction_rows_text(texts, batch))
            return
        scores = self.head.rank_candidates(fused, prompts, self.answer_words, self.candidate_reduction)
        self.task.update_metric(metric, scores, batch)
        if self.predictions_path is not None:
            self._prediction_rows.extend(self.task.prediction_rows(scores, batch))

    def eval_step(self, batch: Mapping[str, Any], stage: Stage) -> LMStepOutput:
        out, fused = self(batch, output_attentions=self.attention_stats)
        if out is not None and out.loss is not None:
            self.eval_loss[stage].update(out.loss.detach().float(), weight=annotated_count(batch))
        self.answer(batch, fused, self.metrics[stage])
        return {"lm": out, "fused": fused}

    # ---- checkpoints ---------------------------------------------------------------------------
    def frozen_head_keys(self) -> list[str]:
        """State-dict keys of the head that never train (the frozen LM's weights): left out of checkpoints."""
        trainable = set(self.head.trainable_state_dict())
        return [HEAD_PREFIX + k for k in self.head.state_dict() if k not in trainable]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in self.frozen_head_keys():
            state.pop(key, None)
        checkpoint["lm_fingerprint"] = self.head.lm_fingerprint()
        checkpoint["lm_regime"] = self.head.regime

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("lm_fingerprint")
        if saved is None:
            raise ValueError("checkpoint has no LM fingerprint: it was not trained with the LM head (training=lm)")
        check_lm_fingerprint(saved, self.head.lm_fingerprint())
        regime = checkpoint.get("lm_regime")
        if regime is not None and regime != self.head.regime:
            raise ValueError(
                f"checkpoint was trained with training.head.regime={regime!r}, the config builds "
                f"{self.head.regime!r}: its trainable weights would not fit; use regime={regime!r}"
            )
        state = checkpoint["state_dict"]
        current = self.head.state_dict(prefix=HEAD_PREFIX)
        for key in self.frozen_head_keys():
            state.setdefault(key, current[key])
        super().on_load_checkpoint(checkpoint)


def _select(fused: FusedTokens, rows: Sequence[int]) -> FusedTokens:
    """The ``rows`` of a batch's fused tokens."""
    index = torch.tensor(list(rows), device=fused.tokens.device)
    weights = fused.encoder_weights
    return FusedTokens(
        tokens=fused.tokens[index], token_encoder=fused.token_encoder, visible=fused.visible[index],
        encoder_weights=None if weights is None else weights[index],
    )
