"""The complementarity study of any encoder-subset sweep: are the encoders complementary, and how does the
model combine them?

``python -m fusion.study <sweep dir>`` (or the callback :class:`fusion.study.cli.StudyCallback`) reads a
sweep's jobs by their resolved configs and writes per task the subset table, best single vs best fused vs
all, the retrain-vs-mask agreement, the utilisation measures and the leaning, then ``study.md`` and
``summary.json``. One module per concept:

- :mod:`.jobs`: finding the jobs and what each one is (task, subset, seed, VE-dropout, fusion, head);
- :mod:`.aggregate`: the subset table and best single vs fused vs all, over seeds;
- :mod:`.leaning`: attention mass and VE-dropout drop per encoder and answer type (all-encoder jobs);
- :mod:`.agreement`: retrained vs masked rankings of the subsets (Kendall, Spearman, top-1);
- :mod:`.utilisation`: Capacity, Necessity, answer changes under masking, effective rank;
- :mod:`.report`: study.md, the plots, the wandb run; :mod:`.cli`: the command and the callback.
"""

from fusion.study.cli import StudyCallback, SubsetTable, main, write_study

__all__ = ["StudyCallback", "SubsetTable", "main", "write_study"]
