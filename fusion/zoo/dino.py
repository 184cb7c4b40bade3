"""``zoo/dino_tiny``: self-distillation without labels (DINO, Caron et al. 2021) at tiny size.

A student (the tower + a projection head) matches, on every crop of an image, the output of a teacher
that only sees the two large ("global") crops. The teacher is an exponential moving average of the
student (momentum rising from ``teacher_momentum`` to 1 on a cosine); its output is centred (a running
mean is subtracted) and sharpened (a low temperature) so that neither one dimension nor the uniform
distribution can win: the two collapse modes DINO avoids without negatives. The student's tower is what
gets saved.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torchvision.transforms import v2

from fusion.encoders.vision import TimmEncoder
from fusion.zoo.recipe import ZooRecipe

__all__ = ["DinoHead", "DinoRecipe", "dino_loss", "multi_crop"]


class DinoHead(nn.Module):
    """DINO's projection head: MLP -> L2-normalised bottleneck -> cosine similarity to ``out_dim`` prototypes.

    (B, D) -> (B, out_dim). The prototypes are normalised in the forward (DINO's weight-normalised last
    layer with its norm fixed to 1), so the logits are cosines and the temperatures set their sharpness.
    """

    def __init__(
        self, in_dim: int, out_dim: int = 256, hidden_dim: int = 256, bottleneck_dim: int = 64, use_bn: bool = False
    ) -> None:
        super().__init__()
        norm = (lambda: nn.BatchNorm1d(hidden_dim)) if use_bn else nn.Identity
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            norm(),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            norm(),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.trunc_normal_(self.prototypes, std=0.02)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        return F.linear(z, F.normalize(self.prototypes, dim=-1))


def dino_loss(
    student: list[Tensor], teacher: list[Tensor], center: Tensor, student_temp: float, teacher_temp: float
) -> Tensor:
    """Cross-entropy from each teacher view to every other student view, averaged over pairs and batch.

    ``student``: one (B, K) logit tensor per crop (the global crops first, in the teacher's order);
    ``teacher``: one (B, K) per global crop; ``center``: (1, K) running mean of the teacher logits.
    """
    targets = [F.softmax((t - center) / teacher_temp, dim=-1) for t in teacher]
    log_probs = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    terms = [
        -(q * log_p).sum(-1).mean()
        for iq, q in enumerate(targets)
        for iv, log_p in enumerate(log_probs)
        if iv != iq  # the student never matches the teacher on the very same view
    ]
    if not terms:
        raise ValueError("dino loss needs at least two crops")
    return torch.stack(terms).mean()


def multi_crop(
    mean: tuple[float, ...],
    std: tuple[float, ...],
    global_size: int,
    local_size: int,
    num_local: int,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
) -> Callable[[Any], dict[str, list[Tensor]]]:
    """DINO's augmentations: 2 global crops (``global_size`` px) and ``num_local`` local crops.

    Random resized crop, flip, colour jitter, grayscale, then blur (always on the first global crop,
    sometimes on the second) and solarisation (second crop only), as in DINO. Image -> ``{"global":
    [(3, G, G)] * 2, "local": [(3, L, L)] * num_local}``.
    """

    def view(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> v2.Compose:
        # Blur kernel about a tenth of the crop (DINO: 23 px at 224), odd as torchvision requires.
        kernel = max(3, (size // 10) | 1)
        return v2.Compose(
            [
                v2.ToImage(),
                v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
                v2.RandomSolarize(threshold=128, p=solarize_p),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(mean), std=list(std)),
            ]
        )

    first, second = view(global_size, global_scale, 1.0, 0.0), view(global_size, global_scale, 0.1, 0.2)
    local = view(local_size, local_scale, 0.5, 0.0)

    def apply(image: Any) -> dict[str, list[Tensor]]:
        return {"global": [first(image), second(image)], "local": [local(image) for _ in range(num_local)]}

    return apply


class DinoRecipe(ZooRecipe):
    """Student tower + :class:`DinoHead`, EMA teacher, multi-crop, centring and sharpening.

    ``local_size`` must be a multiple of the tower's patch size (the tower runs with dynamic image size for
    these crops). Logs the teacher's mean entropy (``<stage>/teacher_entropy``: near ``log(out_dim)``
    means the uniform collapse, near 0 the one-hot collapse), ``<stage>/kl`` (loss minus that entropy:
    what the student has left to learn) and the momentum. ``use_bn`` puts batch norm in the head's MLP
    (an option of DINO's head): at this scale, without it the centring wins within a few dozen steps and
    the teacher collapses to the uniform output.
    """

    needs = ()

    def __init__(
        self,
        encoder: TimmEncoder,
        out_dim: int = 256,
        use_bn: bool = False,
        num_local: int = 4,
        local_size: int = 24,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        center_momentum: float = 0.9,
        teacher_momentum: float = 0.99,
        lr: float = 1e-3,
        weight_decay: float = 0.04,
        warmup_ratio: float = 0.1,
    ) -> None:
        super().__init__(encoder, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio, dynamic_img_size=True)
        patch = self.backbone.patch_embed.patch_size[0]
        if local_size % patch:
            raise ValueError(f"dino recipe: local_size={local_size} must be a multiple of the patch size {patch}")
        if not 0.0 <= teacher_momentum < 1.0:
            raise ValueError(f"dino recipe: teacher_momentum must lie in [0, 1), got {teacher_momentum}")
        self.head = DinoHead(self.embed_dim, out_dim, use_bn=use_bn)
        # The teacher starts as a copy of the student and only ever moves by the EMA below.
        ema = _cosine_ema(self._momentum)
        self.teacher_backbone = AveragedModel(self.backbone, multi_avg_fn=ema).requires_grad_(False)
        self.teacher_head = AveragedModel(self.head, multi_avg_fn=ema).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._crops = multi_crop(
            self.preprocess.mean, self.preprocess.std, self.preprocess.input_size[0], local_size, num_local
        )

    def _momentum(self, step: int) -> float:
        """Teacher momentum at ``step``: ``teacher_momentum`` rising to 1 on a cosine over the run."""
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1
        base = self.hparams.teacher_momentum
        return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total) / total) + 1) / 2

    def transform(self, item: dict[str, Any]) -> dict[str, Any]:
        return self._crops(item["image"])

    def _student(self, crops: list[Tensor]) -> list[Tensor]:
        # One forward per crop size (global, local): a batch must share one resolution.
        x = torch.cat(crops)
        return list(self.head(self.pooled(x)).chunk(len(crops)))

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        global_crops, local_crops = batch["global"], batch["local"]
        student = self._student(global_crops) + (self._student(local_crops) if local_crops else [])
        with torch.no_grad():
            x = torch.cat(global_crops)
            # timm's forward with num_classes=0 is the pooled feature, the same as ``pooled`` gives.
            t = self.teacher_head(self.teacher_backbone(x))
            teacher = list(t.chunk(len(global_crops)))
        loss = dino_loss(student, teacher, self.center, self.hparams.student_temp, self.hparams.teacher_temp)
        with torch.no_grad():
            probs = F.softmax((t - self.center) / self.hparams.teacher_temp, dim=-1)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
            # loss = H(teacher) + KL(teacher || student), averaged over view pairs: the KL part is what
            # the student can still learn (DINO's Fig. 7 tracks both to tell learning from collapse).
            kl = loss.detach() - entropy
            if self.training:
                m = self.hparams.center_momentum
                self.center.mul_(m).add_(t.mean(0, keepdim=True), alpha=1 - m)
        return loss, {"teacher_entropy": entropy, "kl": kl, "momentum": torch.tensor(self._momentum(self.global_step))}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the optimiser step: the teacher follows the freshly updated student.
        self.teacher_backbone.update_parameters(self.backbone)
        self.teacher_head.update_parameters(self.head)


def _cosine_ema(momentum: Callable[[int], float]) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """An ``AveragedModel`` multi-tensor update: ``avg <- m * avg + (1 - m) * current`` with ``m = momentum(n)``."""

    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        # The same fused multi-tensor lerp torch's own get_ema_multi_avg_fn uses.
        torch._foreach_lerp_(averaged, current, 1.0 - momentum(int(num_averaged)))

    return update
