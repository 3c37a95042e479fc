"""Stage 6, report: a run's figures and its self-contained ``report.html``, and Grad-CAM overlays.

Owns :mod:`~.page` (metrics tables, figures and the HTML page) and :mod:`~.cam` (Grad-CAM maps). May import
:mod:`covidct.patients` and the top-level helpers; never training or predict.
"""
