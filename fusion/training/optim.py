"""The optimiser and its schedule: parameter groups by ``no_weight_decay()``, config-built factories.

The optimiser and the scheduler come from config as partials (``conf/training/default.yaml``:
``optimizer`` / ``scheduler`` with ``_partial_: true``, as the lightning-hydra-template does);
:func:`configure` calls them with the parameter groups and the run's number of optimiser steps.

Weight decay follows timm: a parameter is not decayed when it has at most one dimension (biases, norm
weights, scalar temperatures), its name ends in ``.bias``, or a module that owns it lists it in its
``no_weight_decay()`` set (embeddings, [CLS] and query tokens).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from transformers import get_cosine_schedule_with_warmup

__all__ = [
    "GROUPS_RULE", "configure", "cosine_with_warmup", "no_weight_decay_names", "param_groups",
    "regroup_legacy_optimizer_state",
]

OptimizerFactory = Callable[..., Optimizer]
SchedulerFactory = Callable[..., LRScheduler]


def _owned_exclusions(module: nn.Module) -> Iterator[str]:
    """Full names of the parameters that some submodule's ``no_weight_decay()`` lists (relative to it)."""
    for prefix, sub in module.named_modules():
        listed = getattr(sub, "no_weight_decay", None)
        if callable(listed):
            for name in listed():
                yield f"{prefix}.{name}" if prefix else name


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Names of ``module``'s trainable parameters that are not weight-decayed (see the module docstring)."""
    listed = set(_owned_exclusions(module))

    def is_listed(name: str) -> bool:
        # A listed name covers a parameter dict under it too (pos_embed -> pos_embed.<encoder>).
        parts = name.split(".")
        return any(".".join(parts[:i]) in listed for i in range(1, len(parts) + 1))

    return {
        name
        for name, p in module.named_parameters()
        if p.requires_grad and (p.ndim <= 1 or name.endswith(".bias") or is_listed(name))
    }


def param_groups(module: nn.Module, weight_decay: float | None = None) -> list[dict[str, Any]]:
    """Two optimiser groups of ``module``'s trainable parameters: decayed, then not decayed (weight decay 0).

    ``weight_decay`` None leaves the decayed group without a ``weight_decay`` key: it takes the optimiser's own
    (the value the config's ``optimizer`` node gives). Frozen parameters are left out.
    """
    skip = no_weight_decay_names(module)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    first: dict[str, Any] = {"params": decay}
    if weight_decay is not None:
        first["weight_decay"] = weight_decay
    return [first, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.1) -> LRScheduler:
    """Linear warm-up over the first ``warmup_ratio`` of ``total_steps`` optimiser steps, then cosine decay to 0."""
    total_steps = max(int(total_steps), 1)
    return get_cosine_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)


def _kernel(factory: OptimizerFactory, device: torch.device) -> dict[str, bool]:
    """One multi-tensor kernel per step instead of a Python loop over parameters (fused on CUDA), when the
    optimiser takes it and the config does not choose."""
    func = getattr(factory, "func", factory)  # a functools.partial from the config
    given = getattr(factory, "keywords", {}) or {}
    try:
        accepted = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return {}
    if "fused" in given or "foreach" in given:
        return {}
    if device.type == "cuda" and "fused" in accepted:
        return {"fused": True}
    return {"foreach": True} if "foreach" in accepted else {}


def configure(
    module: nn.Module,
    optimizer: OptimizerFactory,
    scheduler: SchedulerFactory | None,
    total_steps: int,
    device: torch.device,
    weight_decay: float | None = None,
) -> dict[str, Any]:
    """What ``LightningModule.configure_optimizers`` returns: ``optimizer(param_groups(module))`` and, unless
    ``scheduler`` is None, ``scheduler(optimizer, total_steps=...)`` stepped every optimiser step."""
    opt = optimizer(param_groups(module, weight_decay), **_kernel(optimizer, device))
    if scheduler is None:
        return {"optimizer": opt}
    schedule = scheduler(opt, total_steps=total_steps)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# Before #16 the groups were chosen by substring ("embed" or "token" in the name, or ndim < 2); a checkpoint
# saved then holds its optimiser state in that order, which regroup_legacy_optimizer_state maps onto today's.
GROUPS_RULE = "no_weight_decay"


def _legacy_groups(module: nn.Module) -> list[list[str]]:
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    skip = [n for n, p in trainable if p.ndim < 2 or "embed" in n or "token" in n]
    return [[n for n, _ in trainable if n not in set(skip)], skip]


def _group_names(module: nn.Module) -> list[list[str]]:
    skip = no_weight_decay_names(module)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    return [[n for n in trainable if n not in skip], [n for n in trainable if n in skip]]


def regroup_legacy_optimizer_state(checkpoint: dict[str, Any], module: nn.Module) -> None:
    """Map the optimiser state of a checkpoint saved before the ``no_weight_decay()`` groups (no ``groups_rule``
    key) onto today's groups, in place, so that such a run resumes: each parameter keeps its moments and moves
    to the group its name now belongs to. A state of another shape is left for torch to refuse."""
    if checkpoint.get("groups_rule") == GROUPS_RULE:
        return
    old, new = _legacy_groups(module), _group_names(module)
    new_index = {name: i for i, name in enumerate(new[0] + new[1])}
    for state in checkpoint.get("optimizer_states", []):
        groups = state["param_groups"]
        if [len(g["params"]) for g in groups] != [len(names) for names in old]:
            continue
        name_of = {i: n for g, names in zip(groups, old, strict=True) for i, n in zip(g["params"], names, strict=True)}
        state["state"] = {new_index[name_of[i]]: s for i, s in state["state"].items()}
        state["param_groups"] = [
            {**g, "params": [new_index[n] for n in names]} for g, names in zip(groups, new, strict=True)
        ]
