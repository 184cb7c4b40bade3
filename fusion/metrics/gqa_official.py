"""GQA's official measures (Hudson & Manning 2019), as the official evaluation script computes them.

The reference is ``eval.py`` of GQA's evaluation download (``https://nlp.stanford.edu/data/gqa/eval.zip``,
"Evaluation Script ver 1.1" on gqadataset.org; a copy with only its default file paths changed is
``junayednaushad/Relation-Network-VQA``, ``gqa/eval.py``). What it does, and what this module does alike:

- **Files.** It loops over ``<tier>_all_questions.json`` (every question, each with ``isBalanced``), reads
  ``<tier>_choices.json`` (per question id: ``valid`` and ``plausible`` answer lists) and the predictions
  ``[{"questionId": str, "prediction": str}]`` into ``{questionId: prediction}`` as they are: no
  normalisation of keys or answers (a later duplicate question id wins).
- **Which questions count.** Only questions with ``isBalanced`` true feed accuracy, the per-type and per-length
  accuracies, validity, plausibility, the distribution and (as the questions whose entailed questions are
  looked at) consistency.
- **Accuracy.** ``prediction == answer`` (exact string equality) scores 1, else 0; the mean over the balanced
  questions. **Open** is the mean over questions whose ``types.structural`` is ``query``; **binary** over all
  the others (``verify``, ``logical``, ``choose``, ``compare``).
- **Accuracy per type and length.** The mean per ``types.structural``, per ``types.semantic``, per number of
  words (``len(question.split())``) and per number of reasoning steps: the operations of the question's
  ``semantic`` program, leaving out those whose ``"<operation>: <argument>"`` contains ``exist``, ``query:
  name`` or ``choose name`` (substring tests).
- **Validity / plausibility.** 1 when the prediction is in the question's ``valid`` (``plausible``) list of
  the choices file, else 0; except that for a question whose ``types.detailed`` contains ``Common`` the list
  is replaced by ``["color", "material", "shape"]``. Means over the balanced questions.
- **Consistency** (printed with ``--consistency``). For each balanced question answered correctly whose
  ``entailed`` list holds another question id than its own, the mean accuracy over those entailed questions
  (their answers from the all-questions file, their predictions from the prediction file); the mean of these
  means. Questions answered wrongly, or without entailed questions, add nothing.
- **Distribution.** Per ``groups.global`` of the balanced questions (a null group is left out), the gold and the
  predicted answer counts; per group the chi-square statistic ``sum over the group's gold answers a of
  (predicted[a] - gold[a])**2 / gold[a]`` (predicted answers that are no gold answer of the group add nothing),
  weighted by the group's number of questions: ``sum(chi2_g * n_g) / sum(n_g) / 100``. Lower is better.
- **Grounding** (``--grounding``) needs the model's attention maps and the scene graphs: not computed here.
- **Output.** It prints percentages (a mean times 100, two decimals); an empty list averages to 0; the
  distribution is printed as computed above (not a percentage). A missing prediction for a balanced question
  (or for any question, with ``--consistency``) stops it.

Conventions of this project, where they differ from the printout: every mean is reported as a fraction in
[0, 1] (the printed percentage / 100, as every accuracy of the project); the distribution is reported as the
script's number. A measure with nothing to average (no binary question, no consistency pair, no question with
a group) is left out, with the reason, rather than reported as the script's 0 (or its ZeroDivisionError); the
headline accuracy, with no question to score, is NaN. A measure whose data is missing (no choices for some
question, an entailed question unknown) is left out with the reason; the script would stop with a KeyError.

Which questions are predicted: the balanced ones and the entailed questions of those (all that the numbers
depend on), not every question of the all-questions file, which the script wants with ``--consistency`` (2M on
val). Its numbers on such a prediction file are the same when it is given (``--questions``) the all-questions
file cut down to those questions.

:func:`official_scores` computes everything from ``{question id: GQAQuestion}`` and ``{question id:
prediction}``; :func:`question_record` reads one question entry of the official files. The metric that
collects an evaluation's predictions and scores them is :class:`fusion.metrics.gqa.GQAMetric`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fusion.io import DataFormatError

# getStepsNum: operations whose "<operation>: <argument>" contains one of these are not reasoning steps.
NON_STEPS = ("exist", "query: name", "choose name")
# belongs(): a question whose types.detailed contains "Common" is valid / plausible with one of these only.
COMMON = "Common"
COMMON_GROUP = ("color", "material", "shape")
# The answer type of a question: "open" for this structural type, "binary" for every other.
OPEN_STRUCTURAL = "query"
# The measures this module computes, in the order the official script prints them (grounding left out).
MEASURES = ("binary", "open", "accuracy", "consistency", "validity", "plausibility", "distribution")
# The detailed accuracies that need more than the answer and the structural type: the GQAQuestion attribute ->
# (the measure, what the attribute is read from), for the reason a measure is left out.
_DETAILS = {
    "semantic": ("accuracy per semantic type", "types.semantic"),
    "steps": ("accuracy per steps number", "'semantic' program"),
    "words": ("accuracy per words number", "question text"),
}


@dataclass(frozen=True)
class GQAQuestion:
    """What the official measures read of one question.

    ``semantic`` (``types.semantic``), ``words`` and ``steps`` are None when the question entry lacks what they
    are computed from; ``entailed`` is None when the entailed questions cannot be scored (their file is absent),
    ``valid`` / ``plausible`` when there is no choices entry for the question. ``balanced``: ``isBalanced``.
    """

    answer: str
    structural: str = ""
    semantic: str | None = None
    detailed: str = ""
    words: int | None = None
    steps: int | None = None
    group: str | None = None
    balanced: bool = True
    entailed: tuple[str, ...] | None = None
    valid: frozenset[str] | None = None
    plausible: frozenset[str] | None = None


def words_number(question: str) -> int:
    """``getWordsNum``: the number of whitespace-separated words of the question text."""
    return len(question.split())


def steps_number(program: Sequence[Mapping[str, Any]]) -> int:
    """``getStepsNum``: the operations of a ``semantic`` program that are reasoning steps (see :data:`NON_STEPS`)."""
    return sum(not any(o in f"{op['operation']}: {op['argument']}" for o in NON_STEPS) for op in program)


def belongs(prediction: str, group: Collection[str], detailed: str) -> bool:
    """``belongs``: whether ``prediction`` is in ``group`` (:data:`COMMON_GROUP` for a ``...Common...`` question)."""
    if COMMON in detailed:
        group = COMMON_GROUP
    return prediction in group


def chi_square(gold: Mapping[str, Mapping[str, int]], predicted: Mapping[str, Mapping[str, int]]) -> float:
    """``chiSquare``: per group the chi-square of predicted vs gold answer counts over the group's gold answers,
    averaged over the groups weighted by their number of questions. Raises ZeroDivisionError without questions."""
    total_score, total = 0.0, 0
    for group, answers in gold.items():
        seen = predicted.get(group, {})
        score = sum((seen.get(a, 0) - e) ** 2 / e for a, e in answers.items())
        size = sum(answers.values())
        total_score += score * size
        total += size
    return total_score / total


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


@dataclass
class GQAScores:
    """The official measures of one set of predictions, as fractions (the distribution as the script's number).

    A measure that could not be computed is None and ``skipped`` says why; the per-type and per-length entries
    are ``(mean, number of questions)``.
    """

    accuracy: float | None = None
    binary: float | None = None
    open: float | None = None
    consistency: float | None = None
    validity: float | None = None
    plausibility: float | None = None
    distribution: float | None = None
    per_structural: dict[str, tuple[float, int]] = field(default_factory=dict)
    per_semantic: dict[str, tuple[float, int]] = field(default_factory=dict)
    per_steps: dict[int, tuple[float, int]] = field(default_factory=dict)
    per_words: dict[int, tuple[float, int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, float]:
        """Flat metric names: ``""`` the accuracy (NaN without any scored question), ``binary``, ``open``,
        ``consistency``, ``validity``, ``plausibility``, ``distribution``, ``<structural type>``,
        ``semantic_<type>``, ``steps_<n>``, ``words_<n>``; measures not computed are left out."""
        out = {"": self.accuracy if self.accuracy is not None else math.nan}
        for name in MEASURES:
            value = getattr(self, name)
            if name != "accuracy" and value is not None:
                out[name] = value
        out.update({t: v for t, (v, _) in sorted(self.per_structural.items())})
        out.update({f"semantic_{t}": v for t, (v, _) in sorted(self.per_semantic.items())})
        out.update({f"steps_{n}": v for n, (v, _) in sorted(self.per_steps.items())})
        out.update({f"words_{n}": v for n, (v, _) in sorted(self.per_words.items())})
        return out


def _by_key(pairs: Iterable[tuple[Any, float]]) -> dict[Any, tuple[float, int]]:
    groups: dict[Any, list[float]] = defaultdict(list)
    for key, score in pairs:
        groups[key].append(score)
    return {k: (_mean(v), len(v)) for k, v in groups.items()}


def _first_missing(qids: Sequence[str], questions: Mapping[str, GQAQuestion], attribute: str) -> str | None:
    return next((q for q in qids if getattr(questions[q], attribute) is None), None)


def official_scores(questions: Mapping[str, GQAQuestion], predictions: Mapping[str, str]) -> GQAScores:
    """Every official measure but grounding for ``predictions`` (question id -> predicted answer).

    The questions scored are the predicted ones that ``questions`` knows and marks balanced; ``questions`` also
    holds the entailed questions consistency looks up (balanced or not).
    """
    out = GQAScores()
    scored = [qid for qid in predictions if qid in questions and questions[qid].balanced]
    if not scored:
        out.skipped["accuracy"] = "no balanced question with a known answer was predicted"
        return out
    hits = {qid: float(predictions[qid] == questions[qid].answer) for qid in scored}
    out.accuracy = _mean(list(hits.values()))
    for kind, is_open in (("binary", False), ("open", True)):
        values = [hits[q] for q in scored if (questions[q].structural == OPEN_STRUCTURAL) == is_open]
        if values:
            setattr(out, kind, _mean(values))
        else:
            out.skipped[kind] = f"no {kind} question (structural type {'' if is_open else 'not '}{OPEN_STRUCTURAL!r})"
    out.per_structural = _by_key((questions[q].structural, hits[q]) for q in scored)
    for attribute, (name, source) in _DETAILS.items():
        missing = _first_missing(scored, questions, attribute)
        if missing is None:
            setattr(out, f"per_{attribute}", _by_key((getattr(questions[q], attribute), hits[q]) for q in scored))
        else:
            out.skipped[name] = f"question {missing!r} has no {source}"
    _validity(out, questions, predictions, scored)
    _consistency(out, questions, predictions, scored, hits)
    _distribution(out, questions, predictions, scored)
    return out


def _validity(out: GQAScores, questions: Mapping[str, GQAQuestion], predictions: Mapping[str, str],
              scored: Sequence[str]) -> None:
    missing = next((q for q in scored if questions[q].valid is None or questions[q].plausible is None), None)
    if missing is not None:
        reason = f"no choices (valid / plausible answers) for question {missing!r}"
        out.skipped["validity"] = out.skipped["plausibility"] = reason
        return
    for name in ("valid", "plausible"):
        values = [float(belongs(predictions[q], getattr(questions[q], name), questions[q].detailed)) for q in scored]
        setattr(out, "validity" if name == "valid" else "plausibility", _mean(values))


def _consistency(out: GQAScores, questions: Mapping[str, GQAQuestion], predictions: Mapping[str, str],
                 scored: Sequence[str], hits: Mapping[str, float]) -> None:
    unknown = _first_missing(scored, questions, "entailed")
    if unknown is not None:
        out.skipped["consistency"] = f"the entailed questions of question {unknown!r} are not known"
        return
    means = []
    for qid in scored:
        entailed = [e for e in questions[qid].entailed or () if e != qid]
        if not hits[qid] or not entailed:
            continue
        absent = next((e for e in entailed if e not in questions or e not in predictions), None)
        if absent is not None:
            what = "answer" if absent not in questions else "prediction"
            out.skipped["consistency"] = f"no {what} for question {absent!r}, entailed by question {qid!r}"
            return
        means.append(_mean([float(predictions[e] == questions[e].answer) for e in entailed]))
    if means:
        out.consistency = _mean(means)
    else:
        out.skipped["consistency"] = "no correctly answered balanced question has entailed questions"


def _distribution(out: GQAScores, questions: Mapping[str, GQAQuestion], predictions: Mapping[str, str],
                  scored: Sequence[str]) -> None:
    gold: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    predicted: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for qid in scored:
        group = questions[qid].group
        if group is not None:
            gold[group][questions[qid].answer] += 1
            predicted[group][predictions[qid]] += 1
    if gold:
        out.distribution = chi_square(gold, predicted) / 100
    else:
        out.skipped["distribution"] = "no balanced question has a groups.global"


# ---- reading question entries ------------------------------------------------------------------------------


def question_record(entry: Mapping[str, Any], where: str, structural: str, answer: str) -> GQAQuestion:
    """The :class:`GQAQuestion` of a question entry whose ``answer`` and ``types.structural`` were read already.

    Fields the measures need beyond those may be absent (hand-made files): the measure that needs one is then
    left out. Present but malformed, they fail naming ``where`` and the key. ``entailed`` is read as given
    (``()`` when absent); the caller decides whether the entailed questions can be scored.
    """
    types = entry.get("types") or {}
    balanced = entry.get("isBalanced", True)
    if not isinstance(balanced, bool):
        raise DataFormatError(f"{where}: key 'isBalanced' is {balanced!r}, expected true or false")
    semantic = _optional(types, "semantic", str, f"{where}, 'types'")
    detailed = _optional(types, "detailed", str, f"{where}, 'types'") or ""
    program = _optional(entry, "semantic", list, where)
    if program is not None:
        for i, op in enumerate(program):
            if not isinstance(op, Mapping) or not all(isinstance(op.get(k), str) for k in ("operation", "argument")):
                raise DataFormatError(
                    f"{where}: 'semantic'[{i}] is {op!r}, expected an object with string 'operation' and 'argument'"
                )
    groups = _optional(entry, "groups", Mapping, where) or {}
    group = _optional(groups, "global", str, f"{where}, 'groups'")
    entailed = _optional(entry, "entailed", list, where) or []
    if not all(isinstance(e, str) for e in entailed):
        raise DataFormatError(f"{where}: key 'entailed' is {entailed!r}, expected a list of question ids (strings)")
    text = entry.get("question")
    return GQAQuestion(
        answer=answer,
        structural=structural,
        semantic=semantic,
        detailed=detailed,
        words=words_number(text) if isinstance(text, str) else None,
        steps=steps_number(program) if program is not None else None,
        group=group,
        balanced=balanced,
        entailed=tuple(entailed),
    )


def _optional(entry: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    """``entry[key]`` if present and not null, else None; a value of another type is a format error."""
    value = entry.get(key) if isinstance(entry, Mapping) else None
    if value is not None and not isinstance(value, kind):
        raise DataFormatError(f"{where}: key {key!r} is {value!r}, expected {kind.__name__} or null")
    return value
