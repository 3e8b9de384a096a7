"""Orchestration: the experiment protocol and the studies above it (no statistics of its own).

``plan`` (fits, units, seeds), ``provenance`` (config.yaml, run.json, splits.json, resume), ``runner``
(progress, one fit), ``spread`` (fits over torchrun processes), ``aggregate`` (out-of-fold rows, metrics,
comparisons, timings), ``final`` (deployable models, thresholds), ``stage`` (one stage on its own),
``protocol`` (:func:`~endodistill.experiment.protocol.run_experiment`), ``study`` (grids of settings on the
same folds, with shared units). The run directory they write is :mod:`endodistill.rundir`.
"""
