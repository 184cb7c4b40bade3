"""One run, from a composed config to files: set-up and tear-down, train, evaluate, extract.

Owns :mod:`.context` (the one set-up and tear-down of every run: seed, config record, loggers, wandb id,
``metrics.json``, closing on failure), :mod:`.commands` (``train``, ``evaluate``, ``extract`` and building
the parts from config),
:mod:`.record` (the run folder's ``config_resolved.yaml``) and :mod:`.cli` (command-line checks Hydra
does not make). Imports everything below it; nothing below imports it.
"""
