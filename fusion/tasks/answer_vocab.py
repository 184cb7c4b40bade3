"""The answer vocabulary of VQA-style tasks: the top-K training answers, cached as JSON beside the data cache,
and :class:`VocabTask`, the base of the tasks answered over it (VQA, GQA)."""

from __future__ import annotations

import hashlib
import json
import logging
from abc import abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from fusion.io import write_text
from fusion.tasks.base import FileTask, resolve_root
from fusion.tasks.formats import DataFormatError, field, read_json

log = logging.getLogger(__name__)

# Bump when the vocabulary recipe (normalisation, counting, ordering) changes: old cache files are ignored.
VOCAB_VERSION = 2  # 2: VQA answers in the form the official evaluator compares them


def vocab_cache_path(cache_dir: str | Path | None, task: str, source: Path, top_k: int | None) -> Path | None:
    """``<cache_dir>/<task>/answer_vocab_<K>_<digest>.json``; the digest pins the source file and recipe."""
    if cache_dir is None:
        return None
    try:
        stat = source.stat()
    except OSError:
        return None  # no training file: building fails later with a message naming it
    key = json.dumps([VOCAB_VERSION, str(source), stat.st_size, stat.st_mtime_ns, top_k])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return resolve_root(cache_dir) / task / f"answer_vocab_{top_k or 'all'}_{digest}.json"


def load_or_build_vocab(
    path: Path | None, count: Callable[[], Counter[str]], top_k: int | None, source: Path
) -> list[tuple[str, int]]:
    """The ``top_k`` most frequent answers with their counts, most frequent first (ties: alphabetical).

    Read from ``path`` if it exists (a pinned ``vocab_file`` is used as it is); otherwise built with
    ``count()`` and written there atomically. An unwritable cache (read-only disk) only costs a rebuild.
    """
    if path is not None and path.is_file():
        data = read_json(path, "answer vocabulary file")
        answers = field(data, "answers", list, str(path), "a list of answer strings")
        counts = field(data, "counts", list, str(path), "a list of integer counts, one per answer")
        if len(answers) != len(counts) or not all(isinstance(a, str) for a in answers):
            raise DataFormatError(f"{path}: 'answers' must be strings, as many as 'counts'")
        if len(set(answers)) != len(answers):
            raise DataFormatError(f"{path}: 'answers' has duplicates")
        return list(zip(answers, counts, strict=True))
    ranked = sorted(count().items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
    if not ranked:
        raise DataFormatError(f"{source}: no training answers to build the answer vocabulary from")
    if path is not None:
        blob = {
            "version": VOCAB_VERSION, "source": str(source), "top_k": top_k,
            "answers": [a for a, _ in ranked], "counts": [c for _, c in ranked],
        }
        try:
            write_text(path, json.dumps(blob))
        except OSError as err:
            log.warning("could not cache the answer vocabulary at %s (%s); it is rebuilt next time", path, err)
    return ranked


class VocabTask(FileTask):
    """A file task answered over the ``top_k`` most frequent answers of its training split (all: None).

    The vocabulary is built on first use from :meth:`_vocab_source` and :meth:`_count_training_answers`, cached
    under ``cache_dir`` (or read from a pinned ``vocab_file``); ``answer_types`` are the types the metrics are
    split by. Subclasses may react to a loaded vocabulary in :meth:`_on_vocab` (precomputed answer forms).
    """

    def __init__(
        self,
        root: str | Path,
        train_split: str,
        val_split: str,
        test_split: str,
        *,
        top_k: int | None,
        vocab_file: str | Path | None,
        cache_dir: str | Path | None,
        answer_types: Sequence[str],
    ) -> None:
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or null (all answers), got {top_k!r}")
        super().__init__(root, train_split, val_split, test_split)
        self.top_k = top_k
        self.vocab_file = Path(vocab_file).expanduser() if vocab_file else None
        self.cache_dir = cache_dir
        self._answer_types = list(answer_types)
        self._vocab: list[str] | None = None
        self._label: dict[str, int] = {}

    @abstractmethod
    def _vocab_source(self) -> Path:
        """The training annotation file the vocabulary is counted from (its stat pins the cached vocabulary)."""

    @abstractmethod
    def _count_training_answers(self) -> Counter[str]:
        """How often each answer occurs in the training split, in the form predictions are compared in."""

    def _on_vocab(self, ranked: list[tuple[str, int]]) -> None:
        """Called once the vocabulary (answers with their counts, most frequent first) is loaded."""

    def _load_vocab(self) -> list[str]:
        if self._vocab is None:
            source = self._vocab_source()
            path = self.vocab_file or vocab_cache_path(self.cache_dir, self.name, source, self.top_k)
            ranked = load_or_build_vocab(path, self._count_training_answers, self.top_k, source)
            self._vocab = [a for a, _ in ranked]
            self._label = {a: i for i, a in enumerate(self._vocab)}
            self._on_vocab(ranked)
        return self._vocab

    @property
    def answers(self) -> list[str]:
        return list(self._load_vocab())

    @property
    def num_classes(self) -> int:
        return len(self._load_vocab())  # without copying the vocabulary (target() asks per sample)

    @property
    def answer_types(self) -> list[str]:
        return list(self._answer_types)
