"""Analysis modes of ``eval.py``: how a trained fusion model uses each encoder and each modality.

One module per mode (``python eval.py mode=<name> ckpt_path=... +experiment=...``); :mod:`.common` holds
the checkpoint loading, the evaluation loop, the input ablations and the report folder they share.
Settings: ``conf/analysis/default.yaml`` (``analysis.<mode>.*``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig


def _lazy(module: str) -> Callable[[DictConfig], Any]:
    """The ``run`` of ``fusion.analysis.<module>``, imported on call (eval.py's other modes skip the import)."""

    def run(cfg: DictConfig) -> Any:
        from importlib import import_module

        return import_module(f"fusion.analysis.{module}").run(cfg)

    run.__name__ = module
    return run


MODES: dict[str, Callable[[DictConfig], Any]] = {
    name: _lazy(name) for name in ("encoder_ablation", "attention", "cross_modal_ablation", "probe", "causal_trace")
}
