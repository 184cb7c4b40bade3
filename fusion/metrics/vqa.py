"""The official VQA accuracy (VQAv2, OK-VQA): answer processing, leave-one-out scoring, a DDP metric.

Rules read from the current ``vqaEval.py`` of the official VQA API (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, after its commit "Fixed processing answers bug"; the
evaluation server and published VQAv2 numbers use this revision), quirks included:

1. Every human answer and the predicted answer get ``\\n`` and ``\\t`` replaced by a space and are stripped
   (:func:`clean`).
2. Only if the (cleaned) human answers of the question are **not all identical**, every human answer **and** the
   prediction get :func:`process_punctuation` and then :func:`process_digit_article` (lower case, number words
   to digits, articles dropped, contractions restored). If they are all identical, neither side is processed
   further: ``"Two"`` against ten ``"2"`` scores 0, ``"2"`` against ten ``"Two"`` too.
3. For each human answer entry, the evaluator counts the matches among "the other" entries, ``[e for e in
   answers if e != entry]``: a comparison of whole answer dicts (answer, answer_confidence, answer_id, after
   step 2), so an entry identical to it in every field is dropped with it. In the official files every entry
   has its own ``answer_id`` and this is plain leave-one-out; :class:`References` keeps the multiplicity so
   that files without ids score as the evaluator scores them.
4. Accuracy = mean over the entries of ``min(1, matches among the others / 3)``; overall and per answer type
   are plain means over questions (the script reports them x100, rounded to 2 decimals; we keep fractions).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torchmetrics import Metric

# Read-only views: these are constants shared by every caller.
CONTRACTIONS = MappingProxyType({
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
})  # fmt: skip
MANUAL_MAP = MappingProxyType({
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
})  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# Verbatim from the official script: "(?!<=\d)" is a (vacuous) lookahead, not a lookbehind, so every
# period not followed by a digit goes, including the one in "3.".
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The official script calls periodStrip.sub("", text, re.UNICODE): re.UNICODE lands in `count` (= 32).
_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Drop or space out punctuation exactly as ``VQAEval.processPunctuation`` does.

    A mark is deleted when it touches a space anywhere in the (original) text, or when the text has a
    digit-comma-digit group; otherwise it becomes a space. Periods not followed by a digit are removed.
    """
    out = text
    digit_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, _PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Lower case, number words to digits, articles removed, contractions restored (``processDigitArticle``)."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def clean(answer: str) -> str:
    """Step 1, applied to every answer: newline and tab become a space, then ``strip``."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """Step 2, applied to both sides when the humans disagree: ``"Two."`` -> ``"2"``, ``"a dog"`` -> ``"dog"``."""
    return process_digit_article(process_punctuation(clean(answer)))


def _entry_identity(entry: Mapping[str, Any]) -> str:
    """The fields of an answer entry other than its text, as the evaluator's ``!=`` compares them."""
    return json.dumps({k: v for k, v in entry.items() if k != "answer"}, sort_keys=True, default=str)


@dataclass(frozen=True, slots=True)
class References:
    """The human answers of one question as the official evaluator compares them (rules 1-3 above).

    ``answers``: one string per entry, cleaned and, when ``normalized``, processed. ``normalized``: whether the
    humans disagreed, so that predictions are processed too. ``ties``: per entry, how many entries equal it in
    every field (itself included), ``None`` when each entry is unique (the official files: distinct
    ``answer_id``).
    """

    answers: tuple[str, ...]
    normalized: bool
    ties: tuple[int, ...] | None = None

    @classmethod
    def from_entries(
        cls, entries: Sequence[str | Mapping[str, Any]], normalize: Callable[[str], str] = normalize_answer
    ) -> References:
        """From the raw ``answers`` of an annotation: ``{"answer": ..., ...}`` dicts, or bare strings (each one
        entry of its own).

        ``normalize``: :func:`normalize_answer` or a memoised version of it (millions of answers, few distinct).
        """
        if not entries:
            raise ValueError("VQA accuracy needs at least one human answer")
        texts = [clean(e if isinstance(e, str) else e["answer"]) for e in entries]
        normalized = len(set(texts)) > 1
        if normalized:
            texts = [normalize(t) for t in texts]
        # A bare string stands for an entry of its own (as with the official files' distinct answer_id).
        keys = [
            (t, i if isinstance(e, str) else _entry_identity(e))
            for i, (t, e) in enumerate(zip(texts, entries, strict=True))
        ]
        counts = Counter(keys)
        ties = tuple(counts[k] for k in keys) if any(c > 1 for c in counts.values()) else None
        return cls(tuple(texts), normalized, ties)

    def form(self, prediction: str) -> str:
        """``prediction`` as the evaluator compares it against these answers."""
        return normalize_answer(prediction) if self.normalized else clean(prediction)

    def score_form(self, form: str) -> float:
        """The accuracy of a prediction already in :meth:`form` (rules 3 and 4)."""
        matches = self.answers.count(form)
        if matches == 0:
            return 0.0
        if self.ties is None:
            return leave_one_out_accuracy(matches, len(self.answers))
        total = 0.0
        for answer, tie in zip(self.answers, self.ties, strict=True):
            total += min(1.0, (matches - tie if answer == form else matches) / 3)
        return total / len(self.answers)

    def score(self, prediction: str) -> float:
        """The official VQA accuracy of the raw ``prediction``."""
        return self.score_form(self.form(prediction))


def leave_one_out_accuracy(matches: int, n: int) -> float:
    """Mean over the ``n`` subsets of ``n - 1`` annotators of ``min(#matches in the subset / 3, 1)``.

    Leaving out one of the ``matches`` agreeing annotators leaves ``matches - 1``, any other leaves
    ``matches``: 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0 (with ten annotators).
    """
    if n <= 0:
        raise ValueError("VQA accuracy needs at least one human answer")
    if not 0 <= matches <= n:
        raise ValueError(f"matches must be in [0, {n}], got {matches}")
    return (matches * min(1.0, (matches - 1) / 3) + (n - matches) * min(1.0, matches / 3)) / n


def vqa_accuracy(prediction: str, answers: Sequence[str | Mapping[str, Any]]) -> float:
    """The official VQA accuracy of one predicted answer against the raw human answers of a question."""
    return References.from_entries(answers).score(prediction)


class VQAAccuracy(Metric):
    """Mean VQA accuracy overall and per answer type; the per-example scores are computed by the caller.

    ``update(scores, types)``: ``scores`` (B,) VQA accuracies in [0, 1], ``types`` (B,) indices into
    ``answer_types``. ``compute()`` gives ``{"": overall, "<type>": mean of that type}`` with ``/`` in type
    names turned into ``_`` (``yes_no``) so they make flat metric keys; types without examples are left out.
    Sums are float64: millions of thirds stay exact enough.
    """

    full_state_update = False

    def __init__(self, answer_types: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.answer_types = list(answer_types)
        n = max(len(self.answer_types), 1)
        self.add_state("score", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor, types: torch.Tensor) -> None:
        types = types.to(self.count.device, torch.long)
        self.score.index_add_(0, types, scores.to(self.score.device, torch.float64))
        self.count.index_add_(0, types, torch.ones_like(types))

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"": (self.score.sum() / self.count.sum().clamp(min=1)).float()}
        for i, name in enumerate(self.answer_types):
            if self.count[i] > 0:
                out[name.replace("/", "_")] = (self.score[i] / self.count[i]).float()
        return out
