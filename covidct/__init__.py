"""covidct: chest CT (DICOM) COVID-19 / CAP / Normal classification with PyTorch Lightning + Hydra.

The stages, in the order data flows through them (each package's docstring says what it owns and may
import): :mod:`~covidct.data` -> :mod:`~covidct.models` -> :mod:`~covidct.patients` ->
:mod:`~covidct.training` / :mod:`~covidct.predict` -> :mod:`~covidct.report`; :mod:`~covidct.bench` measures
them. Shared by all: :mod:`~covidct.contracts` (class, file, column and metric names), :mod:`~covidct.errors`,
:mod:`~covidct.config` and :mod:`~covidct.schema` (the Hydra config and its types), :mod:`~covidct.cli`,
:mod:`~covidct.io`, :mod:`~covidct.processes`, :mod:`~covidct.seeding`, :mod:`~covidct.text_table`.
"""

import os

# albumentations looks for a newer version on the network when it is imported, unless this is set. Every
# entry point and module that uses albumentations imports this package first: the one place it is set.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
