"""Evaluate a checkpoint: python eval.py +experiment=shapes ckpt_path=.../last.ckpt split=val."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from fusion.cli import check_choices
from fusion.run import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    check_choices(Path(__file__).parent / "conf")
    main()
