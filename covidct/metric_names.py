"""The names metrics are logged under, in one place, so that the W&B dashboard has a few sections:

* ``val/...``: the headline per epoch: slice loss and metrics, ``val/patient/acc`` and
  ``val/patient/f1_macro`` of the configured vote rule (what checkpointing and sweeps monitor);
* ``rules/<rule>/<metric>``: every vote rule's patient metrics on the same probabilities;
* ``vote/...``: the vote parameters tuned that epoch (tau, the threshold rule's);
* ``calibration/...``: the temperature and ECE / NLL before and after it;
* ``test/patient/acc``, ``test_rules/<rule>/<metric>``: the held-out test patients (``data.split_file``).

Class names in keys are slugs (``COVID-19`` -> ``covid_19``), e.g. ``rules/majority/sensitivity_covid_19``.
"""

from __future__ import annotations

import re

#: the configured rule's patient accuracy: what checkpointing, early stopping and sweepers monitor
PATIENT_ACC = "val/patient/acc"
PATIENT_F1 = "val/patient/f1_macro"


def class_slug(name: str) -> str:
    """``COVID-19`` -> ``covid_19``, ``CAP`` -> ``cap``: a class name as a metric key part."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def rule_metric(rule: str, metric: str, split: str = "val") -> str:
    """Key of vote rule ``rule``'s patient ``metric`` (``acc``, ``f1_macro``, ``sensitivity_<slug>``, ...):
    ``rules/<rule>/<metric>`` for validation epochs, ``<split>_rules/<rule>/<metric>`` otherwise."""
    return f"{'' if split == 'val' else split + '_'}rules/{rule}/{metric}"


def vote_parameter(name: str) -> str:
    """Key of a tuned vote parameter: ``vote/<name>`` (``tau``, ``threshold_slice_threshold``, ...)."""
    return f"vote/{name}"


def calibration_metric(name: str) -> str:
    """Key of a calibration figure: ``calibration/<name>`` (``temperature``, ``slice_ece_before``, ...)."""
    return f"calibration/{name}"
