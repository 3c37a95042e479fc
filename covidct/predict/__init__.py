"""Stage 5, predict: new patients -> one CSV per test folder (``predict.py``), and the deployment tools.

Owns test-set discovery and reading (:mod:`~.test_sets`), the prediction settings (:mod:`~.settings`), running
a model over test sets (:mod:`~.predictor`), the PyTorch and ONNX backends
(:mod:`~.torch_backend`, :mod:`~.onnx_backend`), test-time augmentation (:mod:`~.tta`), ONNX / int8 export
(:mod:`~.export`) and scoring a run against labels (:mod:`~.evaluate`, reading :mod:`~.eval_inputs`,
metrics :mod:`~.eval_metrics`). May import data, models, patients
and :mod:`covidct.report.cam`; never training. The ONNX path imports no torch.
"""
