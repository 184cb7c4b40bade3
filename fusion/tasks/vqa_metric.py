"""The official VQA accuracy (VQAv2, OK-VQA): answer normalisation, leave-one-out scoring, a DDP metric.

Answer processing reproduces ``vqaEval.py`` of the official VQA API (github.com/GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation``), quirks included, so numbers match the evaluation server:

- a predicted answer gets ``\\n``/``\\t`` -> space, ``strip``, :func:`process_punctuation`, then
  :func:`process_digit_article` (lower case, number words -> digits, articles dropped, contractions);
- the human answers only get :func:`process_punctuation`, and only when the ten of them are not all
  identical (the released answers are already normalised);
- accuracy = mean over the ten leave-one-out subsets of nine annotators of ``min(#matches / 3, 1)``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from types import MappingProxyType

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


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official script compares it: ``"Two."`` -> ``"2"``, ``"a dog"`` -> ``"dog"``."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def official_references(answers: Sequence[str]) -> tuple[str, ...]:
    """The human answers as the official script compares them (punctuation only, and only if they differ)."""
    if len(set(answers)) > 1:
        return tuple(process_punctuation(a) for a in answers)
    return tuple(answers)


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


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of one predicted answer against the raw human answers of a question."""
    references = official_references(answers)
    return leave_one_out_accuracy(references.count(normalize_answer(prediction)), len(references))


def soft_scores(answers: Iterable[str]) -> dict[str, float]:
    """Training target: each distinct answer's VQA accuracy were it predicted (answers already normalised).

    The leave-one-out average is exactly the accuracy the metric would give that answer, so the loss
    trains towards the expected score (a smooth ``min(#/3, 1)`` would overrate 1-3 votes).
    """
    counts = Counter(answers)
    n = sum(counts.values())
    return {a: leave_one_out_accuracy(m, n) for a, m in counts.items()}


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
