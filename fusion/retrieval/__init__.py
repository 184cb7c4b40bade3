"""Image-text retrieval (Flickr30k): the dual encoder's first stage and the fusion model's re-ranking.

Owns :mod:`.dual_encoder` (embeddings, contrastive loss, hard negatives) and :mod:`.module` (the
retrieval LightningModule). Imports training; never the run entry points.
"""
