"""What a run shows while and after it trains: attention-over-encoder statistics, fuser weights, progress.

Owns :mod:`.attention_stats`, :mod:`.fuser_weights`, :mod:`.callbacks` (the Lightning callbacks that
accumulate the evaluation steps' outputs and write files, wandb tables and figures) and :mod:`.progress`
(the progress bar / log lines). Imports the model; never training.
"""
