"""Stage 3, patients: slice probabilities -> one call per patient.

Owns the vote parameters (:mod:`~.parameters`: :class:`~.parameters.VoteParameters` and their defaults), the
rules' arithmetic (:mod:`~.voting`) and registry (:mod:`~.rules`), the tuning of their thresholds
(:mod:`~.tuning`), the slice-score aggregates and the MIL head (:mod:`~.aggregation`, :mod:`~.mil_features`),
temperature calibration (:mod:`~.calibration`), a validation epoch's decisions (:mod:`~.decisions`), their
explanation per patient (:mod:`~.explanations`) and patient metrics (:mod:`~.metrics`).
Pure numpy / torch: no Lightning, no Hydra, no files, so training's callback, predict.py and the
held-out test all decide the same way. May import only :mod:`covidct.contracts`, :mod:`covidct.errors`,
:mod:`covidct.metric_names` and :mod:`covidct` (class names).
"""
