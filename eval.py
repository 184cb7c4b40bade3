"""Evaluate a checkpoint: python eval.py +experiment=shapes ckpt_path=.../last.ckpt split=val."""

import hydra
from omegaconf import DictConfig

from fusion.run import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
