"""What a run shows while and after it trains: attention-over-encoder statistics, fuser weights, progress.

Owns :mod:`.attention_stats`, :mod:`.fuser_weights`, :mod:`.callbacks` (the Lightning callbacks that
accumulate the evaluation steps' outputs and write files, wandb tables and figures), :mod:`.progress`
(training's progress bar / log lines) and :mod:`.counter` (the progress of long loops outside training: a
cache build, data generation; imported by data and tasks, so it imports nothing of fusion's but options).
Imports the model; never training.
"""
