"""covidct: chest CT (DICOM) COVID-19 / CAP / Normal classification with PyTorch Lightning + Hydra."""

import os

# albumentations looks for a newer version on the network when it is imported, unless this is set. Every
# entry point and module that uses albumentations imports this package first: the one place it is set.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

CLASS_NAMES: tuple[str, ...] = ("COVID-19", "CAP", "Normal")
"""Class index -> name. Index 2 (Normal) is the 'uninfected' class used by slice labels and votes."""

NORMAL_CLASS: int = 2

__version__ = "0.1.0"
