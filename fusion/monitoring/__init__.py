"""What a run shows while and after it trains: attention-over-encoder statistics, fuser weights, progress.

Owns :mod:`.attention_stats`, :mod:`.fuser_weights`, :mod:`.callbacks` (the Lightning callbacks that
accumulate the evaluation steps' outputs and write files, wandb tables and figures) and :mod:`.progress`
(training's progress bar / log lines). Long loops outside training (a cache build,
data generation) show progress through :mod:`fusion.counter`, a lower layer. Imports the model; never training.
"""
