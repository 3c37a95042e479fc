"""covidct: chest CT (DICOM) COVID-19 / CAP / Normal classification with PyTorch Lightning + Hydra."""

CLASS_NAMES: tuple[str, ...] = ("COVID-19", "CAP", "Normal")
"""Class index -> name. Index 2 (Normal) is the 'uninfected' class used by slice labels and votes."""

NORMAL_CLASS: int = 2

__version__ = "0.1.0"
