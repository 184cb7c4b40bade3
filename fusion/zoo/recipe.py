"""What every zoo recipe shares: a trainable copy of a tiny timm tower, the optimiser, and saving the tower.

A recipe gets the :class:`~fusion.encoders.vision.TimmEncoder` built from ``conf/encoder/<name>.yaml`` and trains
its timm model, so the architecture (``model_name`` + ``model_kwargs``) and the preprocessing are exactly
what ``encoder=<name> encoder.<name>.weights=<file>`` later rebuilds around the saved state dict.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Collection
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import timm
import torch
from safetensors.torch import save
from torch import Tensor, nn

from fusion.encoders.vision import TimmEncoder, state_dict_digest
from fusion.io import atomic_write, write_bytes
from fusion.training.optim import configure, cosine_with_warmup

__all__ = ["SaveEncoder", "ZooRecipe", "save_encoder"]


class ZooRecipe(pl.LightningModule, ABC):
    """Base LightningModule: ``self.backbone`` (the timm tower, trainable) + the recipe's own heads.

    Subclasses define :meth:`transform` (one data item -> tensors), :meth:`collate` (optional),
    :meth:`loss` and ``needs`` (what an image folder must provide: ``captions``, ``classes``).
    ``dynamic_img_size`` lets the tower take other input sizes (DINO's small local crops); it changes no
    parameter, so the saved state dict still loads into the configured architecture.
    """

    needs: Collection[str] = ()

    def __init__(
        self,
        encoder: TimmEncoder,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_ratio: float = 0.1,
        dynamic_img_size: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, TimmEncoder):
            raise TypeError(
                f"zoo recipes train timm towers; encoder {getattr(encoder, 'name', encoder)!r} is a "
                f"{type(encoder).__name__}, not a fusion.encoders.vision.TimmEncoder"
            )
        if encoder.layer != -1:
            raise ValueError(
                f"encoder {encoder.name!r}: zoo recipes train the whole tower; set layer=-1, not {encoder.layer}"
            )
        # Modules are not hyperparameters (and do not serialise to YAML); their configs are in the run folder.
        self.save_hyperparameters(ignore=["encoder", "text"])
        self.encoder_name = encoder.name
        self.model_name = encoder.model_name
        self.model_kwargs = dict(encoder.model_kwargs)
        self.preprocess = encoder.preprocess
        if dynamic_img_size:
            backbone = timm.create_model(self.model_name, num_classes=0, dynamic_img_size=True, **self.model_kwargs)
            backbone.load_state_dict(encoder.model.state_dict())
        else:
            backbone = encoder.model
        # The wrapper froze it; here it is what we train.
        self.backbone: nn.Module = backbone.requires_grad_(True).train()
        self.embed_dim = int(encoder.embed_dim)

    # ---- what a recipe defines ------------------------------------------------------------------
    @abstractmethod
    def transform(self, item: dict[str, Any]) -> dict[str, Any]:
        """One data item ``{"image", "caption", "targets"}`` -> the tensors this recipe trains on."""

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Items -> batch; default stacks tensors (and nested dicts of tensors) along a new dim 0."""
        return torch.utils.data.default_collate(items)

    @abstractmethod
    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The training objective on a batch and extra scalars to log (without stage prefix)."""

    # ---- shared ---------------------------------------------------------------------------------
    def pooled(self, pixels: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, D): the tower's pooled output ([CLS] after the final norm for these ViTs)."""
        return self.backbone.forward_head(self.backbone.forward_features(pixels), pre_logits=True)

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The tower's weights as TimmEncoder loads them (CPU, contiguous: what safetensors wants)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, logs = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        for key, value in logs.items():
            self.log(f"train/{key}", value)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, logs = self.loss(batch)
        self.log("val/loss", loss, prog_bar=True)
        for key, value in logs.items():
            self.log(f"val/{key}", value)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over :func:`~fusion.training.optim.param_groups` (no weight decay for biases, norms and the
        ``no_weight_decay()`` names: timm's ``pos_embed`` / ``cls_token``, the text tower's embeddings), with
        a linear warm-up and cosine decay stepped every optimiser step."""
        hp = self.hparams
        optimizer = partial(torch.optim.AdamW, lr=hp.lr, weight_decay=hp.weight_decay, foreach=True)
        schedule = partial(cosine_with_warmup, warmup_ratio=hp.warmup_ratio)
        return configure(self, optimizer, schedule, int(self.trainer.estimated_stepping_batches), self.device)


def save_encoder(state: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, Any]) -> Path:
    """Write ``state`` as ``.safetensors`` (or ``.pth``) atomically; the metadata rides in the header."""
    path = Path(path).expanduser()
    if path.suffix not in (".safetensors", ".pth"):
        raise ValueError(f"zoo output {str(path)!r}: use a .safetensors or .pth file name")
    if path.suffix == ".safetensors":
        write_bytes(path, save(state, metadata={k: json.dumps(v) for k, v in metadata.items()}))
    else:
        atomic_write(path, lambda f: torch.save(state, f))
    return path


class SaveEncoder(pl.Callback):
    """Save the recipe's tower to ``path`` when training ends (also after ``max_time`` stops it)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        self.saved: Path | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, ZooRecipe):
            raise TypeError(f"SaveEncoder saves zoo recipes, got {type(pl_module).__name__}")
        if not trainer.is_global_zero:
            return
        metadata = {
            "encoder": pl_module.encoder_name,
            "recipe": type(pl_module).__name__,
            "model_name": pl_module.model_name,
            "model_kwargs": pl_module.model_kwargs,
            "global_step": trainer.global_step,
            "sha256": state_dict_digest(pl_module.backbone),
        }
        self.saved = save_encoder(pl_module.encoder_state_dict(), self.path, metadata)
