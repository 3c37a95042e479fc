"""Stage 6, report: a run's figures and its self-contained ``report.html``, and Grad-CAM overlays.

Owns :mod:`~.metrics` (what the report shows and computes: ROC, reliability, key metrics), :mod:`~.figures`
and :mod:`~.patient_figures` (every figure, matplotlib; inline SVG through :mod:`~.svg`), :mod:`~.page` (the
HTML page, the jinja2 template in ``templates/``) and :mod:`~.cam` (Grad-CAM maps). May import
:mod:`covidct.patients`, :mod:`covidct.data` (the preprocessing windows CAM overlays are drawn in) and the
top-level helpers; never training or predict.
"""
