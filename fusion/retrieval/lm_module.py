"""Image-text retrieval with the LM head (``+experiment=flickr30k_lm``): the contrastive first stage as in
:mod:`fusion.retrieval.module`, re-ranking by a pretrained causal LM asked whether the caption matches the image.

Training, per batch of matching (image, caption) pairs: the first stage's contrastive loss (ITC), as today;
then on the pairs today's image-text matching trains on (each positive pair, one hard negative caption per
image and one hard negative image per caption, mined the same way), the LM's teacher-forced loss of the answer
word after the fuser's visual tokens of the pair's image and the prompt ``training.head.prompt_template`` over
the caption (``{question}``, e.g. ``Does the caption match the image? Caption: {question} Answer:``): the
``match`` word (``yes``) for positive pairs, the ``no_match`` word (``no``) for negatives
(``training.answer_words``). Its weight is ``itm_weight``; it is logged as ``train/itm``.

Evaluation as :class:`~fusion.retrieval.module.RetrievalLitModule`: the first stage ranks the whole split,
the top ``rerank_k`` candidates of each query (both directions) are re-scored, here by the LM's log-odds
``log p(yes) - log p(no)`` of the pair (:meth:`RetrievalLMLitModule.match_scores`), and the recalls of both
stages are logged; eval.py writes the task's rankings file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fusion.encoders.text import TextEncoder
from fusion.encoders.vision import VisionEncoder
from fusion.fusers.base import FusedTokens
from fusion.metrics.ranking import PairScorer
from fusion.model.transformer import FusionModel
from fusion.retrieval.module import RetrievalLitModule
from fusion.tasks.base import VLTask
from fusion.training.lm_module import LMLitModule, LMStepOutput

# The task's answers are (no match, match), in the order of the matching labels (RetrievalLitModule: 1 = match).
NO_MATCH, MATCH = 0, 1
DEFAULT_WORDS = ("no", "yes")


class RetrievalLMLitModule(RetrievalLitModule, LMLitModule):
    """Retrieval whose second stage is the LM head: :class:`~fusion.retrieval.module.RetrievalLitModule`'s first
    stage, hard negatives, gallery and re-ranking, with :class:`~fusion.training.lm_module.LMLitModule`'s head.

    From the LM module (the second base class) it takes, unchanged: the fusion model without transformer blocks
    (only the fuser's tokens reach the LM) and its unused parts frozen, the :class:`~fusion.model.lm.LMHead`
    from ``training.head`` (LM by hub name or folder, regime ``projector``/``lora``/``full``, prompt template),
    the checked ``answer_words`` and ``candidate_reduction``, and its checkpoints: trainable weights only, with
    the LM's fingerprint and regime, refused for another LM or regime. From the retrieval module (the first
    base class): the first stage (``embed_dim``, ``temperature``, ``itc_weight``, ``hardest_negatives``), the
    evaluation epoch (``rerank_k``, ``rerank_batch_size``: pairs per LM pass, each pair two sequences) and the
    rankings file. ``itm_weight`` weighs the LM's matching loss. ``answer_words``: the words for the task's
    answers (default ``{no_match: "no", match: "yes"}``); ``max_new_tokens`` is accepted and unused.

    Re-ranking score: ``log p(yes) - log p(no)``, the log-odds of the two words the LM is trained on (each
    word's tokens and EOS, as trained, through :meth:`~fusion.model.lm.LMHead.rank_candidates`), rather than
    ``log p(yes)`` alone: it is the counterpart of today's ITM log-odds (logit match - logit no match), so the
    two second stages rank by the same kind of number; and ``log p(yes)`` alone also carries how much mass the
    LM puts on words other than either answer after a given caption (a caption-dependent offset that moves a
    caption's score against other captions when an image's captions are ranked), which the difference cancels.

    The analysis modes of eval.py refuse it as they refuse every retrieval module (its scores are rankings).
    """

    def __init__(
        self,
        encoders: Mapping[str, VisionEncoder],
        text: TextEncoder,
        task: VLTask,
        fusion: Callable[..., FusionModel] = FusionModel,
        head: Callable[..., nn.Module] | None = None,
        answer_words: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        if head is None:
            raise ValueError("retrieval with the LM head needs training.head: an LMHead (conf/training/lm.yaml)")
        if answer_words is None and len(task.answers) == 2:
            answer_words = dict(zip(task.answers, DEFAULT_WORDS, strict=True))
        # Plain containers: the value from a config is an OmegaConf node, and hparams go into checkpoints.
        answer_words = None if answer_words is None else {str(k): str(v) for k, v in answer_words.items()}
        super().__init__(encoders, text, task, fusion=fusion, head=head, answer_words=answer_words, **kwargs)

    # ---- the pairs' LM inputs and scores -------------------------------------------------------
    def pair_tokens(
        self, features: Mapping[str, Tensor], image_idx: Tensor, text_states: Tensor, text_mask: Tensor,
        text_idx: Tensor,
    ) -> FusedTokens:
        """The fuser's visual tokens (P, N, width) of the pairs (image ``image_idx[p]``, caption ``text_idx[p]``),
        VE-dropout applied; the caption's text states reach fusers that read the text (``gated``) only.
        ``features[name]`` (n_images, N_e, D_e); ``text_states`` (n_texts, L, D_t); ``text_mask`` (n_texts, L)."""
        feats = {name: f[image_idx] for name, f in features.items()}
        keep = self.ve_dropout(len(image_idx))
        if self.fusion.fuser.uses_text:
            hidden, mask = text_states[text_idx], text_mask[text_idx].bool()
        else:  # the fuser ignores the text: no projection of it
            hidden = text_states.new_zeros(len(image_idx), 1, text_states.shape[-1])
            mask = torch.zeros(len(image_idx), 1, dtype=torch.bool, device=text_states.device)
        fused, _ = self.fusion.visual_tokens(feats, keep, hidden, mask)
        return fused

    def match_prompts(self, captions: Sequence[str], text_idx: Tensor) -> list[str]:
        """The prompt of each pair: the template over its caption ``captions[text_idx[p]]``."""
        return self.head.prompts([{"question": captions[t]} for t in text_idx.tolist()])

    def match_scores(self, fused: FusedTokens, prompts: Sequence[str]) -> Tensor:
        """(P,) float32: ``log p(match word) - log p(no_match word)`` of each pair under the LM (the words' tokens
        and EOS, summed or averaged by ``candidate_reduction``); 2P sequences in one LM pass."""
        scores = self.head.rank_candidates(fused, prompts, self.answer_words, self.candidate_reduction)
        return scores[:, MATCH].float() - scores[:, NO_MATCH].float()

    def itm_logits(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "the LM head has no matching classifier: pairs are scored by match_scores (the LM's log p(yes) - "
            "log p(no))"
        )

    def pair_scorer(
        self, features: Mapping[str, Tensor], text_states: Tensor, text_mask: Tensor, captions: Sequence[str] = ()
    ) -> PairScorer:
        """The LM's log-odds (:meth:`match_scores`) of (text, image) index pairs, ``rerank_batch_size`` pairs at a
        time; ``captions``: the gallery's raw captions (the prompts)."""
        if len(captions) != text_states.shape[0]:
            raise ValueError(
                f"the LM re-ranks from each caption's text, but the gallery holds {len(captions)} texts for "
                f"{text_states.shape[0]} captions"
            )

        def score(t: Tensor, i: Tensor, length: int) -> Tensor:
            fused = self.pair_tokens(features, i, text_states[:, :length], text_mask[:, :length], t)
            return self.match_scores(fused, self.match_prompts(captions, t))

        return self.chunked(score, text_mask)

    # ---- training ------------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        features, states, mask, itc, pairs = self.contrastive_step(batch)
        B = mask.shape[0]
        fused = self.pair_tokens(features, pairs.image_idx, states, mask, pairs.text_idx)
        prompts = self.match_prompts(batch["questions"], pairs.text_idx)
        answers = [self.answer_words[label] for label in pairs.labels.tolist()]
        itm = self.head(fused, prompts, answers).loss
        loss = self.itc_weight * itc + self.itm_weight * itm
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log_dict({"train/itc": itc, "train/itm": itm}, batch_size=B)
        return loss

    # ---- evaluation ----------------------------------------------------------------------------
    def matching_statistics(
        self, batch: Mapping[str, Any], features: Mapping[str, Tensor], image_idx: Tensor, states: Tensor,
        mask: Tensor,
    ) -> LMStepOutput:
        """For the statistics callbacks: the fused tokens of the batch's matching pairs and, under
        ``attention_stats``, the LM's teacher-forced pass over them answering the match word, with attentions."""
        text_idx = torch.arange(len(image_idx), device=image_idx.device)
        fused = self.pair_tokens(features, image_idx, states, mask, text_idx)
        if not self.attention_stats:
            return {"fused": fused}
        prompts = self.match_prompts(batch["questions"], text_idx)
        out = self.head(fused, prompts, [self.answer_words[MATCH]] * len(prompts), output_attentions=True)
        return {"lm": out, "fused": fused}
