"""Stage 3, patients: slice probabilities -> one call per patient.

Owns the vote rules and their parameters (:mod:`~.voting`), the slice-score aggregates and the MIL head
(:mod:`~.aggregation`, :mod:`~.mil_features`) and temperature calibration (:mod:`~.calibration`).
Pure numpy / torch: no Lightning, no Hydra, no files, so training's callback, predict.py and the
held-out test all decide the same way. May import only :mod:`covidct.contracts` and :mod:`covidct.errors`.
"""
