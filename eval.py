"""Evaluate a checkpoint: python eval.py +experiment=shapes ckpt_path=.../last.ckpt split=val.

Other modes: ``mode=extract`` builds the feature caches of the configured encoders (see conf/cache/);
``mode=collect sweep_dir=<multirun folder>`` gathers a sweep's metrics.json into one table (fusion/sweeps/collect.py);
the analysis modes (``mode=encoder_ablation`` ..., fusion/analysis/) write a report folder about a checkpoint.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from fusion.analysis import MODES as ANALYSIS_MODES
from fusion.run.cli import check_choices
from fusion.run.commands import evaluate, extract
from fusion.sweeps.collect import collect_from_config

MODES = {"eval": evaluate, "extract": extract, "collect": collect_from_config, **ANALYSIS_MODES}


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    mode = str(cfg.get("mode", "eval"))
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
    MODES[mode](cfg)


if __name__ == "__main__":
    check_choices(Path(__file__).parent / "conf")
    main()
