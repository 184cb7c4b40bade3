"""Frozen vision encoders that turn images into token features ``(B, N_e, D_e)``, [CLS]/prefix first.

Two backends share one interface (:class:`VisionEncoder`): timm towers built by name
(:class:`TimmEncoder`: CLIP, DINO, supervised ViT... from timm's hub or a local weights file) and any
transformers vision model (:class:`HFVisionEncoder`). Each encoder carries its own preprocessing
(:class:`~fusion.encoders.preprocess.Preprocess`) and a fingerprint that identifies its features for caching.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import timm
import torch
from timm.models import split_model_name_tag
from torch import Tensor, nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from fusion.encoders.preprocess import Preprocess

__all__ = [
    "HFVisionEncoder",
    "Preprocess",
    "TimmEncoder",
    "VisionEncoder",
    "from_pretrained_or_explain",
    "state_dict_digest",
]

T = TypeVar("T")


class VisionEncoder(nn.Module, ABC):
    """A frozen image tower: ``forward(pixel_values (B, 3, H, W)) -> (B, N_e, D_e)``.

    ``layer`` picks the block whose output is returned, Python-indexed over the blocks: ``-1`` (or the
    last index) is the model's final, normed features; any other block gives its raw (un-normed)
    output, e.g. ``-2`` = second to last as in Prismatic. The wrapped ``model`` never leaves eval mode
    and has no trainable parameter.
    """

    name: str
    embed_dim: int
    num_tokens: int
    # [CLS]/register tokens in front of the patch grid; the remaining ``num_tokens - num_prefix_tokens``
    # tokens are the patches, row-major. Fusers that pool or resample the grid need it.
    num_prefix_tokens: int = 1
    preprocess: Preprocess
    layer: int
    model: nn.Module

    def __init__(self, name: str, layer: int = -1) -> None:
        super().__init__()
        self.name = name
        self.layer = layer

    @abstractmethod
    def _features(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N_e, D_e) from block ``self._block``."""

    @abstractmethod
    def _source(self) -> dict[str, Any]:
        """Where the weights come from (backend, model name or path...), for the fingerprint."""

    @torch.no_grad()
    def forward(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N_e, D_e).

        ``no_grad`` rather than ``inference_mode``: the output feeds trainable layers, and inference
        tensors cannot be saved for their backward.
        """
        return self._features(pixel_values)

    def train(self, mode: bool = True) -> VisionEncoder:
        # Lightning calls .train() on the whole model; dropout / drop-path must stay off here.
        return super().train(False)

    def _set_model(self, model: nn.Module, depth: int) -> None:
        """Freeze ``model`` and resolve ``self.layer`` against its ``depth`` blocks."""
        self.model = model.requires_grad_(False).eval()
        self._block = _resolve_layer(self.layer, depth, self.name)
        self._last = self._block == depth - 1

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this encoder's features: source, weights digest, layer, preprocessing."""
        return {
            "name": self.name,
            **self._source(),
            "sha256": state_dict_digest(self.model),
            "layer": self._block,
            "preprocess": self.preprocess.as_dict(),
        }

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, layer={self.layer}, num_tokens={self.num_tokens}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, embed_dim={self.embed_dim}"
        )


class TimmEncoder(VisionEncoder):
    """A timm ViT-family tower built by name (e.g. ``vit_base_patch16_clip_224.openai``).

    Weights, in order of precedence: ``weights`` (a local ``.pth``/``.bin``/``.safetensors`` state dict or
    a big_vision ``.npz``, loaded through timm's own pretrained path so its checkpoint filters apply);
    ``pretrained=True`` (timm's hub download); else a random init that only depends on ``init_seed``.
    ``model_kwargs`` go to ``timm.create_model`` (tiny variants override ``embed_dim``, ``depth``,
    ``img_size``...). Preprocessing comes from the model's pretrained config.
    """

    def __init__(
        self,
        name: str,
        model_name: str,
        pretrained: bool = False,
        weights: str | os.PathLike | None = None,
        layer: int = -1,
        init_seed: int = 0,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(name, layer)
        _check_timm_name(model_name, name)
        self.model_name = model_name
        self.model_kwargs = _plain(model_kwargs)
        kwargs = dict(num_classes=0, **self.model_kwargs)
        if weights is not None:
            path = Path(weights).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"encoder {name!r}: weights file {str(path)!r} does not exist")
            # timm marks npz-only tags (augreg) custom_load; a torch state dict needs the plain loader.
            overlay = dict(file=str(path), custom_load=path.suffix == ".npz")
            try:
                model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
            except RuntimeError as e:  # strict loading: missing / unexpected keys or shapes
                raise ValueError(
                    f"encoder {name!r}: weights file {str(path)!r} lacks tensors of timm model {model_name!r} or "
                    f"has other shapes; is it a state dict of this architecture (and of these model_kwargs)? {e}"
                ) from e
            if path.suffix != ".npz":
                _check_weights_cover(model, path, name, model_name)
        elif pretrained:
            try:
                model = timm.create_model(model_name, pretrained=True, **kwargs)
            except OSError as e:  # hub unreachable (offline) or no such file there
                raise RuntimeError(
                    f"encoder {name!r}: could not download pretrained weights of timm model {model_name!r} "
                    f"({type(e).__name__}: {e}); offline, pass encoder.{name}.weights=<local file>"
                ) from e
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                model = timm.create_model(model_name, pretrained=False, **kwargs)
        if not hasattr(model, "blocks") or not hasattr(model, "forward_intermediates"):
            raise ValueError(f"encoder {name!r}: timm model {model_name!r} is not a token (ViT-family) model")
        self._set_model(model, len(model.blocks))

        data_cfg = timm.data.resolve_data_config({}, model=model)
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:  # resolve_data_config keeps the pretrained 224 when img_size is overridden
            data_cfg["input_size"] = (3, *img_size)
        self.preprocess = Preprocess.from_data_config(data_cfg)
        self.embed_dim = int(model.num_features)
        self.num_tokens = _count_tokens(self)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))

    def _features(self, pixel_values: Tensor) -> Tensor:
        if self._last:
            return self.model.forward_features(pixel_values)
        ((patches, prefix),) = self.model.forward_intermediates(
            pixel_values,
            indices=[self._block],
            return_prefix_tokens=True,
            norm=False,
            output_fmt="NLC",
            intermediates_only=True,
        )
        return torch.cat([prefix, patches], dim=1)

    def _source(self) -> dict[str, Any]:
        # No weights path or origin (hub/file/seed): the digest identifies the weights, and the same
        # weights read from a moved file or from the hub must keep matching caches and checkpoints.
        return {"source": "timm", "model": self.model_name}


class HFVisionEncoder(VisionEncoder):
    """Any transformers vision model by hub name or local folder (ViT, CLIP, DINOv2, SigLIP...).

    For a dual-tower checkpoint (a config with ``vision_config``, e.g. ``CLIPModel``) only the vision
    tower is loaded. Preprocessing comes from the checkpoint's image processor. Layer ``-1`` is
    ``last_hidden_state``; block ``i`` is ``hidden_states[i + 1]`` (``hidden_states[0]`` is the embeddings).
    """

    def __init__(self, name: str, name_or_path: str | os.PathLike, layer: int = -1) -> None:
        super().__init__(name, layer)
        self.name_or_path = str(name_or_path)
        what, hint = f"vision encoder {name!r}", f"pass encoder.{name}.name_or_path=<local folder>"
        config = from_pretrained_or_explain(AutoConfig.from_pretrained, self.name_or_path, what, hint)
        # AutoModel maps a vision sub-config to its vision-only class (CLIPVisionConfig -> CLIPVisionModel).
        config = getattr(config, "vision_config", None) or config
        model = from_pretrained_or_explain(AutoModel.from_pretrained, self.name_or_path, what, hint, config=config)
        processor = from_pretrained_or_explain(AutoImageProcessor.from_pretrained, self.name_or_path, what, hint)
        self._set_model(model, model.config.num_hidden_layers)
        self.preprocess = Preprocess.from_image_processor(processor)
        self.embed_dim = int(model.config.hidden_size)
        self.num_tokens = _count_tokens(self)
        self.num_prefix_tokens = _hf_prefix_tokens(model.config, self.num_tokens, self.preprocess.input_size)

    def _features(self, pixel_values: Tensor) -> Tensor:
        if self._last:
            return self.model(pixel_values=pixel_values).last_hidden_state
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[self._block + 1]

    def _source(self) -> dict[str, Any]:
        return {"source": "transformers", "model": self.name_or_path}


def state_dict_digest(module: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes) in sorted key order."""
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def from_pretrained_or_explain(loader: Callable[..., T], name_or_path: str, what: str, hint: str, **kwargs: Any) -> T:
    """``loader(name_or_path)`` (a transformers ``from_pretrained``) with errors that name the value.

    An existing folder is loaded as is (transformers' own errors describe what is missing inside it);
    a path-like value that does not exist raises ``FileNotFoundError``; a hub name that cannot be
    fetched (offline, no such repo) raises ``OSError`` with ``hint``.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return loader(str(path), **kwargs)
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(f"{what}: no folder {name_or_path!r}; {hint}")
    try:
        return loader(name_or_path, **kwargs)
    except OSError as e:
        raise OSError(
            f"{what}: {name_or_path!r} could not be loaded: no local folder of that name and the hub is "
            f"unreachable or has no such model; {hint}"
        ) from e


def _looks_like_path(value: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a separator is meant as a folder.
    return value.startswith((".", "/", "~")) or value.count("/") > 1 or "\\" in value


def _resolve_layer(layer: int, depth: int, name: str) -> int:
    """Python-style block index -> non-negative one; out of range -> ValueError naming both."""
    if not -depth <= layer < depth:
        raise ValueError(
            f"encoder {name!r}: layer={layer} is out of range; the model has {depth} blocks, "
            f"valid layers are {-depth}..{depth - 1} (-1 = last, normed)"
        )
    return layer % depth


def _count_tokens(encoder: VisionEncoder) -> int:
    # One probe forward: exact for every backend (prefix/register tokens, interpolated positions).
    h, w = encoder.preprocess.input_size
    return int(encoder(torch.zeros(1, 3, h, w)).shape[1])


def _hf_prefix_tokens(config: Any, num_tokens: int, input_size: tuple[int, int]) -> int:
    """Tokens beyond the patch grid ([CLS], registers): the probe's count minus the config's patch count."""
    patch = getattr(config, "patch_size", None)
    if patch is None:  # no patch grid in the config to subtract: assume the usual single [CLS]
        return 1
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    # Hierarchical models (Swin...) downsample past the patch grid and output fewer tokens: no prefix.
    return max(num_tokens - (input_size[0] // ph) * (input_size[1] // pw), 0)


def _check_timm_name(model_name: str, name: str) -> None:
    """Unknown architecture or pretrained tag -> ValueError with up to 5 close timm names."""
    if ":" in model_name:  # hf-hub:org/repo and friends: timm resolves those itself
        return
    arch, tag = split_model_name_tag(model_name)
    if timm.is_model(arch) and (not tag or timm.list_pretrained(model_name)):
        return
    candidates = timm.list_pretrained() if tag else timm.list_models()
    close = difflib.get_close_matches(model_name, candidates, n=5, cutoff=0.6)
    raise ValueError(
        f"encoder {name!r}: unknown timm model {model_name!r}; close matches: {close or 'none'} "
        f"(list more with timm.list_models('*{arch.split('_')[0]}*', pretrained=True))"
    )


def _plain(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Hydra passes a DictConfig; timm and the fingerprint want plain Python values."""
    if kwargs is None:
        return {}
    from omegaconf import OmegaConf

    if OmegaConf.is_config(kwargs):
        return OmegaConf.to_container(kwargs, resolve=True)
    return dict(kwargs)


def _check_weights_cover(model: nn.Module, path: Path, name: str, model_name: str) -> None:
    """Fail unless ``path`` provides every tensor of ``model`` (after timm's own key conversion).

    timm loads non-strictly whenever it drops a classifier (our towers have ``num_classes=0``), so a file
    with other key names would otherwise leave the encoder silently at its random init.
    """
    state = timm.models.load_state_dict(str(path))
    convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if convert is not None:
        state = convert(state, model)
    expected = list(model.state_dict())
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(
            f"encoder {name!r}: weights file {str(path)!r} lacks {len(missing)} of the {len(expected)} tensors of "
            f"timm model {model_name!r} (first missing: {missing[:3]}; the file has e.g. {list(state)[:3]}); "
            "is it a state dict of this architecture (and of these model_kwargs)?"
        )
