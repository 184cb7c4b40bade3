"""Training samples/s with the feature cache vs online encoding: same model, same batches.

    python bench/cache_vs_online.py                          # tiny encoders (shapes experiment), 30 steps
    python bench/cache_vs_online.py --base                   # + base-size CLIP/DINO/ViT (random init), 3 steps
    python bench/cache_vs_online.py --only-base --base-steps 5
    python bench/cache_vs_online.py fusion=gated             # extra Hydra overrides for both runs

The real training path: ``fusion.run.commands.build`` of ``+experiment=shapes`` gives the data module and the
:class:`~fusion.training.module.FusionLitModule`, and a Lightning ``Trainer`` built from ``conf/trainer`` (fp32,
gradient clipping, AdamW + cosine schedule from the module) fits it with ``data.num_workers`` (2)
workers. Once with ``cache.enabled=true`` (batches carry the cached fp16 features, the encoders never
run) and once without (workers decode and transform the images, the frozen encoders run in the
training process). Both start from the same weights and the same seed, so they see the same batches in
the same order. The caches are built before timing (kept in ``--cache-dir`` for reruns). Time runs from
the end of the ``--warmup``-th step to the end of the last one (loading included: a starved step waits
for its batch); the two runs alternate ``--repeats`` times and the medians are printed.

Base-size runs use the three base encoders of ``conf/encoder/{clip,dino,vit}.yaml`` with random init
(no download), a small shapes task (``--base-images`` training images) and batch ``--base-batch-size``:
online encoding at 224 px on a CPU takes seconds per batch.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training_setup import add_size_arguments, run_sizes, shapes_config, start  # noqa: E402

from fusion.run.commands import build  # noqa: E402


class StepTimer(pl.Callback):
    """Wall time and samples from the end of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.end = 0.0
        self.samples = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        step = trainer.global_step  # steps done, this one included
        if step == self.warmup:
            self.start = time.perf_counter()
        elif step > self.warmup:
            self.samples += int(batch["labels"].shape[0])
            self.end = time.perf_counter()

    @property
    def rate(self) -> float:
        return self.samples / (self.end - self.start) if self.start is not None and self.samples else float("nan")


def fit(cfg, datamodule, model, init: dict, steps: int, warmup: int) -> float:
    """Samples/s of ``steps`` training steps after ``warmup`` ones, from the initial weights ``init``."""
    model.load_state_dict(init)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    timer = StepTimer(warmup)
    trainer = instantiate(
        cfg.trainer, callbacks=[timer], logger=False, accelerator="cpu", max_epochs=-1, max_steps=warmup + steps,
        limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=datamodule)
    return timer.rate


def run(name: str, encoders: list[str], args: argparse.Namespace, base: bool, out: Path) -> None:
    steps = args.base_steps if base else args.steps
    warmup = args.warmup if args.warmup is not None else (1 if base else 5)
    cfg_cached, cfg_online = (
        shapes_config(encoders, args, out, base, [f"cache.enabled={on}"]) for on in ("true", "false")
    )
    pl.seed_everything(cfg_cached.seed, verbose=False)
    dm_cached, model = build(cfg_cached)
    dm_online, _ = build(cfg_online)
    dm_cached.prepare_data()  # builds the caches (or opens them): not part of the timing
    dm_online.prepare_data()
    init = copy.deepcopy(model.state_dict())
    rates: dict[str, list[float]] = {"cache": [], "online": []}
    for _ in range(args.repeats):  # alternating, so a burst of load elsewhere hits both alike
        rates["cache"].append(fit(cfg_cached, dm_cached, model, init, steps, warmup))
        rates["online"].append(fit(cfg_online, dm_online, model, init, steps, warmup))
    cached, online = statistics.median(rates["cache"]), statistics.median(rates["online"])
    ratios = [c / o for c, o in zip(rates["cache"], rates["online"], strict=True)]
    tokens = " + ".join(str(e.num_tokens) for e in model.encoders.values())
    print(f"{name:<5} {','.join(encoders):<26} {tokens:>15} {cfg_cached.data.batch_size:>5} {steps:>5} "
          f"{online:>12.1f} {cached:>12.1f} {cached / online:>9.2f}   "
          f"{' '.join(f'{r:.2f}' for r in ratios)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run, tiny encoders")
    parser.add_argument("--base-steps", type=int, default=3, help="timed steps per run, base-size encoders")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 5 tiny, 1 base)")
    parser.add_argument("--repeats", type=int, default=3)
    add_size_arguments(parser)
    args = parser.parse_args()
    start(args)
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, repeats {args.repeats} (medians), "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print(f"{'size':<5} {'encoders':<26} {'tokens':>15} {'batch':>5} {'steps':>5} {'online smp/s':>12} "
          f"{'cache smp/s':>12} {'cache/onl':>9}   per-repeat ratios")
    run_sizes(run, args)


if __name__ == "__main__":
    main()
