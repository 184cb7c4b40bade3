"""Image-text retrieval (Flickr30k): the dual encoder's first stage and the fusion model's re-ranking.

Owns :mod:`.dual_encoder` (embeddings, contrastive loss, hard negatives), :mod:`.module` (the
retrieval LightningModule) and :mod:`.lm_module` (its variant re-ranking with the LM head). Imports training;
never the run entry points.
"""
