"""Train a fusion model: python train.py +experiment=shapes [overrides]; the encoder zoo: +experiment=zoo/all."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from fusion.run.cli import check_choices
from fusion.run.commands import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    if cfg.get("zoo") is not None:  # +experiment=zoo/...: pretrain zoo towers, or a task on their weights
        from fusion.zoo.entry import run as run_zoo

        metrics = run_zoo(cfg)
    else:
        metrics = train(cfg)
    # The value a hyperparameter sweeper optimises.
    return metrics.get(cfg.monitor.metric)


if __name__ == "__main__":
    check_choices(Path(__file__).parent / "conf")
    main()
