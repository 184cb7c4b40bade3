"""Training: the LightningModule, its optimiser groups, exact resume and preemption.

Owns :mod:`.module` (:class:`~fusion.training.module.FusionBase`, :class:`~fusion.training.module.TaskModule`
and the classification :class:`~fusion.training.module.FusionLitModule`), :mod:`.lm_module` (the LM head's
:class:`~fusion.training.lm_module.LMLitModule`, ``training=lm``), :mod:`.fsdp` (``trainer=fsdp``'s wrap
policy), :mod:`.optim` (parameter groups, schedule),
:mod:`.resume` (RNG restore, checkpoint choice) and :mod:`.preempt` (SLURM signal and requeue). Imports
data, the model and monitoring; never the run entry points, analysis or sweeps.
"""
