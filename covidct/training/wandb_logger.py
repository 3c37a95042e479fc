"""The W&B logger of ``logger=wandb``: Lightning's, whose history charts only the configured vote rule.

Every validation epoch the patient vote logs every rule's patient metrics (``rules/<rule>/<metric>``, and
``test_rules/<rule>/<metric>`` for the held-out test patients): 7 rules x 8-9 scalars. W&B's automatic
workspace makes one line chart of each, so the configured rule's (also logged as ``val/patient/*``) would be
lost among some 60 charts. This logger leaves the other rules' scalars out of the W&B history; the other
loggers (CSV, TensorBoard) and ``metrics.json`` keep them all, W&B keeps them in the per-epoch ``rules/table``
and, for the best epoch, in the run summary (:func:`covidct.training.run_logging.publish_best_epoch`).

(``define_metric(..., hidden=True)`` would keep the charts' data in W&B, but whether the workspace honours it is
up to the W&B app, which has not always done so: wandb/wandb#8890.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pytorch_lightning import loggers


class RuleChartWandbLogger(loggers.WandbLogger):
    """A :class:`pytorch_lightning.loggers.WandbLogger` that logs no scalar ``rules/<rule>/<metric>`` or
    ``test_rules/<rule>/<metric>`` of a rule other than ``charted_rule`` (media such as ``rules/table`` pass).
    ``charted_rule``: ``vote.rule``; None charts every rule. Every other argument: Lightning's WandbLogger's."""

    def __init__(self, *args: Any, charted_rule: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.charted_rule = charted_rule

    def charted(self, key: str) -> bool:
        """Whether ``key`` goes to the W&B history: anything but another rule's ``[test_]rules/<rule>/<metric>``."""
        parts = key.split("/")
        other_rule = len(parts) == 3 and parts[0] in ("rules", "test_rules") and parts[1] != self.charted_rule
        return self.charted_rule is None or not other_rule

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        kept = {k: v for k, v in metrics.items() if self.charted(k)}
        if kept:
            super().log_metrics(kept, step)
