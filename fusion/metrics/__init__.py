"""Metrics as the official evaluators compute them (DDP-correct through torchmetrics states).

Owns :mod:`.accuracy` (accuracy by answer type), :mod:`.vqa` (vqaEval.py), :mod:`.gqa` (GQA's eval.py
measures), :mod:`.binary` (NLVR/NLVR2 consistency, AUROC) and :mod:`.ranking` (retrieval recall). Imports
nothing of fusion but :mod:`fusion.io`: tasks choose their metric from here.
"""
