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
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import nn
from torchmetrics import MeanMetric, Metric

from fusion.fusers.base import FusedTokens
from fusion.fusers.groups import LM_RESERVED_NAMES
from fusion.model import lm_parts
from fusion.model.lm import LMHead, LMHeadOutput, LMInputs, check_lm_fingerprint, format_prompt, template_fields
from fusion.model.transformer import FusionModel
from fusion.monitoring.attention_stats import LMAttentionOverEncoders
from fusion.training.module import ScoredBatch, Stage, TaskModule, annotated_count

log = logging.getLogger(__name__)

HEAD_PREFIX = "head."
# The example fields a prompt template may use (the collated batch's raw text).
PROMPT_FIELDS = ("question",)
LMStepOutput = dict[str, Any]  # {"lm": LMHeadOutput | None, "fused": FusedTokens}, read by the statistics callbacks
# The attribute names of a decoder layer's self-attention, and of that attention's output projection, across
# the transformers architectures (Llama/Qwen2/Mistral: self_attn.o_proj; GPT-2: attn.c_proj; others dense/out_proj).
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
OUT_PROJ_NAMES = ("o_proj", "c_proj", "out_proj", "dense")


@dataclass
class LMLayer:
    """One decoder layer of the LM: the layer, its self-attention and that attention's output projection (its
    input holds the heads' outputs side by side, ``heads x head_dim``)."""

    layer: nn.Module
    attention: nn.Module
    out_proj: nn.Module


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
    def predict(self, batch: Mapping[str, Any], fused: FusedTokens) -> tuple[list[str], torch.Tensor | None]:
        """Each example's answer string (generated; or the task's answer whose word ranks first) and, for
        closed-set tasks, the ``(B, C)`` rank-classification log-likelihoods of the task's answers (their
        ``answer_words``; None where the answer is generated)."""
        prompts = self.prompts(batch)
        if self.task.open_ended:
            return self.head.generate(fused, prompts, self.max_new_tokens), None
        scores = self.head.rank_candidates(fused, prompts, self.answer_words, self.candidate_reduction)
        answers = self.task.answers
        return [answers[i] for i in scores.argmax(-1).tolist()], scores

    def answer(
        self, batch: Mapping[str, Any], fused: FusedTokens, metric: Any
    ) -> tuple[list[str], torch.Tensor | None]:
        """Answer every example and feed ``metric`` (and eval.py's prediction rows): generation for open-ended
        tasks, rank classification over the task's answers otherwise. Returns :meth:`predict`'s answers and
        scores."""
        texts, scores = self.predict(batch, fused)
        if scores is None:
            self.task.update_metric_text(metric, texts, batch)
            if self.predictions_path is not None:
                self._prediction_rows.extend(self.task.prediction_rows_text(texts, batch))
        else:
            self.task.update_metric(metric, scores, batch)
            if self.predictions_path is not None:
                self._prediction_rows.extend(self.task.prediction_rows(scores, batch))
        return texts, scores

    def score_answers(
        self, batch: Mapping[str, Any], metric: Metric, loss_mean: MeanMetric, output_attentions: bool = False
    ) -> ScoredBatch:
        """The evaluation step: the teacher-forced pass over the labelled rows (its loss into ``loss_mean``,
        weighted by the annotated examples), then every example answered into ``metric`` (:meth:`answer`)."""
        out, fused = self(batch, output_attentions=output_attentions)
        if out is not None and out.loss is not None:
            loss_mean.update(out.loss.detach().float(), weight=annotated_count(batch))
        texts, scores = self.answer(batch, fused, metric)
        labelled = [i for i, a in enumerate(self.answer_strings(batch)) if a is not None]
        rows = None if len(labelled) == len(texts) else torch.tensor(labelled, dtype=torch.long, device=self.device)
        return ScoredBatch(texts, scores, out, rows, fused)

    def eval_step(self, batch: Mapping[str, Any], stage: Stage) -> LMStepOutput:
        scored = self.score_answers(batch, self.metrics[stage], self.eval_loss[stage], self.attention_stats)
        return {"lm": scored.out, "fused": scored.fused}

    # ---- what the analysis modes read (fusion.analysis) --------------------------------------------
    def attention_statistics(self) -> LMAttentionOverEncoders:
        layers, heads = self.lm_attention_shape
        return LMAttentionOverEncoders(self.encoder_names, layers, heads, mixed=self.mixes_encoders).to(self.device)

    def update_attention_statistics(
        self, stats: Metric, scored: ScoredBatch, rows: torch.Tensor | None = None
    ) -> None:
        """The teacher-forced pass's attention (its prompt queries and first answer query) over the labelled
        rows; a batch without any adds nothing."""
        out: LMHeadOutput | None = scored.out
        if out is None:
            return
        if out.attentions is None:
            raise ValueError("no attention read-out: score the batch with output_attentions=True")
        attentions, groups = list(out.attentions), out.inputs.groups
        if rows is not None:
            keep = rows if scored.rows is None else rows[scored.rows]  # the out rows among the wanted batch rows
            if not bool(keep.any()):
                return
            attentions, groups = [a[keep] for a in attentions], groups[keep]
        stats.update(attentions, groups)

    def prompt_pass(
        self, batch: Mapping[str, Any], output_attentions: bool = False, output_hidden_states: bool = False
    ) -> tuple[LMHeadOutput, FusedTokens]:
        """The LM over every example's visual tokens and prompt, without an answer (what generation's first step
        reads): ``hidden_states`` (embeddings, then each layer's output, the last one after the LM's final norm)
        and ``attentions`` as asked; ``logits`` of the last position only."""
        fused = self.fused_tokens(batch)
        inputs = self.head.build_inputs(fused, self.prompts(batch))
        out = self.head.run_lm(inputs, output_attentions, output_hidden_states, logits_to_keep=1)
        return LMHeadOutput(out.logits, inputs, None, out.attentions, out.hidden_states), fused

    def question_token_counts(self, questions: Sequence[str]) -> list[int]:
        """How many of its prompt's LM tokens each question takes: the prompt's tokens whose characters overlap
        the question's (at its first place in the template; 0 for a template without ``{question}``)."""
        template = self.head.prompt_template
        prompts = self.head.prompts([{"question": q} for q in questions])
        encoded = self.head.tokenizer(prompts, add_special_tokens=False, return_offsets_mapping=True)
        prefix = format_prompt(template.split("{question}", 1)[0], {}) if "{question}" in template else None
        counts = []
        for question, prompt, offsets in zip(questions, prompts, encoded["offset_mapping"], strict=True):
            start = -1 if prefix is None or not question else prompt.find(question, len(prefix))
            end = start + len(question)
            counts.append(0 if start < 0 else sum(1 for a, b in offsets if a < end and b > start))
        return counts

    def answer_probability(
        self, fused: FusedTokens, prompts: Sequence[str], answers: Sequence[str]
    ) -> tuple[torch.Tensor, LMInputs, torch.Tensor]:
        """``(B,)`` the probability of one answer per example, as the task's answers are scored: for open-ended
        tasks that of its tokens (+ EOS) under teacher forcing, the exponentiated log-likelihood; for closed-set
        tasks (``answers``: entries of ``task.answers``) its share of the softmax over rank classification's
        log-likelihoods of every answer of the task (their ``answer_words``).
        Also the pass's LM inputs (B rows; ``B * C`` for closed-set tasks, each example's C candidates in a row)
        and ``example`` (rows,) long, the example of each row."""
        B = len(prompts)
        if self.task.open_ended:
            out = self.head(fused, prompts, list(answers))
            assert out.inputs.labels is not None
            logp = lm_parts.sequence_logprob(out.logits, out.inputs.labels, "sum")
            return logp.exp(), out.inputs, torch.arange(B, device=logp.device)
        task_answers, candidates = list(self.task.answers), self.answer_words
        unknown = [a for a in answers if a not in task_answers]
        if unknown:
            raise ValueError(f"answers {unknown[:5]} are not answers of task {self.task.name!r}")
        C = len(candidates)
        repeated = FusedTokens(
            tokens=fused.tokens.repeat_interleave(C, 0), token_encoder=fused.token_encoder,
            visible=fused.visible.repeat_interleave(C, 0),
        )
        out = self.head(repeated, [p for p in prompts for _ in range(C)], list(candidates) * B)
        assert out.inputs.labels is not None
        scores = lm_parts.sequence_logprob(out.logits, out.inputs.labels, self.candidate_reduction).view(B, C)
        index = torch.tensor([task_answers.index(a) for a in answers], device=scores.device)
        probs = scores.float().softmax(-1).gather(1, index[:, None]).squeeze(1)
        return probs, out.inputs, torch.arange(B, device=scores.device).repeat_interleave(C)

    def lm_layers(self) -> list[LMLayer]:
        """The LM's decoder layers in order, each with its self-attention and output projection."""
        lm = self.head.base_lm
        count = int(lm.config.get_text_config().num_hidden_layers)
        stack = next((m for m in lm.modules() if isinstance(m, nn.ModuleList) and len(m) == count), None)
        if stack is None:
            raise ValueError(f"cannot find the {count} decoder layers of {type(lm).__name__}")
        layers = []
        for i, layer in enumerate(stack):
            attention = next((getattr(layer, n) for n in ATTENTION_NAMES if hasattr(layer, n)), None)
            proj = next((getattr(attention, n) for n in OUT_PROJ_NAMES if hasattr(attention, n)), None)
            if attention is None or proj is None:
                raise ValueError(
                    f"decoder layer {i} of {type(lm).__name__} ({type(layer).__name__}) has no self-attention "
                    f"({'/'.join(ATTENTION_NAMES)}) with an output projection ({'/'.join(OUT_PROJ_NAMES)})"
                )
            layers.append(LMLayer(layer, attention, proj))
        return layers

    # ---- checkpoints ---------------------------------------------------------------------------
    def frozen_head_keys(self) -> list[str]:
        """State-dict keys of the head that never train (the frozen LM's weights): left out of checkpoints."""
        trainable = set(self.head.trainable_state_dict())
        return [HEAD_PREFIX + k for k in self.head.state_dict() if k not in trainable]

    def unsaved_keys(self) -> set[str]:
        return super().unsaved_keys() | set(self.frozen_head_keys())

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
