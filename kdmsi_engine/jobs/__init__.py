"""The jobs a user runs, each the engine side of one ``kdmsi`` command.

``run`` (:mod:`.run`) and ``batch`` (:mod:`.batch`) chain the stages of :mod:`.stages` with one
typed :class:`~kdmsi_engine.jobs.config.RunConfig`; both end every scene with
:func:`~kdmsi_engine.jobs.stages.finish_scene`. The single-stage jobs live beside the code they
run: ``grid`` and ``labels`` in :mod:`kdmsi_engine.data`, ``train`` in
:mod:`kdmsi_engine.training.kd`, ``train-detector`` in :mod:`kdmsi_engine.training.detector`,
``infer`` in :mod:`kdmsi_engine.inference.scene`, ``cva``, ``pseudo``, ``detect``,
``vectorize`` and ``evaluate`` (:mod:`kdmsi_engine.metrics`) in their own modules.
"""

from __future__ import annotations
