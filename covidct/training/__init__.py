"""Stage 4, training: a composed config -> a Lightning run (``train.py``).

Owns building and running a run (:mod:`~.run`), what it tells its loggers (:mod:`~.run_logging`,
:mod:`~.wandb_logger`), the Lightning callbacks (:mod:`~.callbacks`: patient vote, checkpoints, report, W&B
tables and CAMs), the console (:mod:`~.console`), the W&B privacy layer, the sweep summary, the
two-stage pseudo-labelling job and the held-out test. May import every earlier stage, predict (the
held-out test scores through predict.py's path) and report.
"""
