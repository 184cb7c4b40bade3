"""fusion: V+L models on several frozen vision encoders at once.

One package per step of the data path (files -> task -> encoders or cache -> fuser -> transformer -> head ->
metric -> logger), listed in dependency order: each may import only packages listed before it, never one
after it (``tests/test_layers.py`` checks this and that there are no cycles):

1. :mod:`fusion.io`, :mod:`fusion.options`, :mod:`fusion.counter`: atomic file writes, config value checks, the
   progress of long loops (no fusion imports but options).
2. :mod:`fusion.metrics`: the official metrics (accuracy by type, VQA, GQA, binary groups, ranking).
3. :mod:`fusion.tasks`: files in their official formats -> examples, targets, a task's metric.
4. :mod:`fusion.encoders`: frozen vision encoders, the text encoder, preprocessing, token grids.
5. :mod:`fusion.data`: the Lightning data module, image decoding, samplers, the feature cache.
6. :mod:`fusion.fusers`: several encoders' tokens -> one sequence of visual tokens.
7. :mod:`fusion.model`: the multimodal transformer, score functions, heads, VE-dropout, token groups.
8. :mod:`fusion.monitoring`: attention and fuser statistics, progress lines (Lightning callbacks).
9. :mod:`fusion.training`: the LightningModule, optimiser groups, exact resume, preemption.
10. :mod:`fusion.retrieval`: image-text retrieval (dual encoder + re-ranking module).
11. :mod:`fusion.run`: one run's set-up and tear-down; train, evaluate and extract.
12. :mod:`fusion.sweeps`: collecting a sweep's results, launcher checks.
13. :mod:`fusion.analysis`: eval.py's analysis modes.
14. :mod:`fusion.study`: the complementarity study over a sweep.
15. :mod:`fusion.zoo`: the tiny encoder zoo (pretraining recipes and their probe).
"""

# The layer order above, lowest first; tests/test_layers.py enforces it.
LAYERS: tuple[str, ...] = (
    "io", "options", "counter", "metrics", "tasks", "encoders", "data", "fusers", "model", "monitoring", "training",
    "retrieval", "run", "sweeps", "analysis", "study", "zoo",
)
