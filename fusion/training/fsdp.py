"""Fully sharded data parallel (``trainer=fsdp``) for LM heads that do not fit one GPU: one FSDP unit per
decoder layer of the language model, found from the model itself.

transformers models name the layers that must not be split across devices in ``_no_split_modules``
(``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ``GPT2Block`` ...); :class:`DecoderLayerPolicy` wraps each
module of those classes, whatever LM the config loads, so the config needs no class names.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers import PreTrainedModel

__all__ = ["DecoderLayerPolicy"]


class DecoderLayerPolicy:
    """An FSDP ``auto_wrap_policy`` callable: wraps every module whose class is named in the
    ``_no_split_modules`` of a transformers model inside the root module, or in ``extra``.

    FSDP calls it first on the root module (``recurse=True``), where it reads the layer names; then per
    submodule: ``recurse`` -> keep descending, else wrap if the class name is one of them.
    """

    def __init__(self, extra: Sequence[str] = ()) -> None:
        self.names: set[str] = set(extra)
        self._scanned = False

    def layer_names(self, root: nn.Module) -> set[str]:
        """The class names of ``root``'s transformers models' unsplittable layers, plus ``extra``."""
        for module in root.modules():
            if isinstance(module, PreTrainedModel):
                self.names.update(getattr(module, "_no_split_modules", None) or ())
        self._scanned = True
        if not self.names:
            raise ValueError(
                "FSDP found no transformers model with _no_split_modules in the module to wrap; name the layer "
                "classes with trainer.strategy.auto_wrap_policy.extra=[...]"
            )
        return self.names

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if not self._scanned:
            self.layer_names(module)
        if recurse:
            return True
        return type(module).__name__ in self.names
