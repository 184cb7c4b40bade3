"""What a run shows while and after it trains: attention-over-encoder statistics, fuser weights, progress.

Owns :mod:`.attention_stats`, :mod:`.fuser_weights` and :mod:`.progress` (the progress bar / log lines);
they read the model's step outputs and write files, tables and figures. Imports the model; never training.
"""
