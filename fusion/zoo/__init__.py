"""A tiny encoder zoo: CLIP-, DINO- and supervised-style pretraining of the tiny ViTs in minutes on a CPU.

Each recipe trains the architecture of ``conf/encoder/<name>_tiny.yaml`` with a different objective on
generated scenes (:mod:`fusion.zoo.scenes`) or an image folder, and saves the tower as a timm state dict
that :class:`fusion.encoders.vision.TimmEncoder` loads through ``encoder.<name>.weights=<file>``:

- :mod:`fusion.zoo.clip`: contrastive image-caption pretraining with a small text tower;
- :mod:`fusion.zoo.dino`: self-distillation without labels (EMA teacher, multi-crop, centring, sharpening);
- :mod:`fusion.zoo.supervised`: supervised multi-label classification of the generated attributes.

:mod:`fusion.zoo.probe` measures what the towers learned (linear probes, linear CKA);
:mod:`fusion.zoo.entry` is what ``train.py`` runs for a config with a ``zoo`` key. The encoder-subset study
of a sweep (``+experiment=zoo/complementarity``) is :mod:`fusion.study` (:mod:`fusion.zoo.study` is its
old name, kept as an alias).
"""
