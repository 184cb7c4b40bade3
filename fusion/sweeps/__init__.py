"""Sweeps: many runs at once. Owns :mod:`.collect` (a sweep's metrics into one table) and
:mod:`.launch_check` (SLURM launcher values checked before submission). Imports :mod:`fusion.run`.
"""
