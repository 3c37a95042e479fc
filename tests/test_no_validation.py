"""Train on every patient (data.val_fraction=0): no validation epochs; the vote parameters come from a
validated run's checkpoint (vote.from_ckpt) or the rules' defaults, and the run says which."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from covidct.errors import ConfigError
from tests.conftest import compose_train, tiny


def vote_state(path) -> dict:
    callbacks = torch.load(path, map_location="cpu", weights_only=True)["callbacks"]
    return next(v for k, v in callbacks.items() if k.startswith("PatientVoteCallback"))


@pytest.mark.slow
def test_a_run_on_every_patient_trains_without_validation_and_says_where_its_thresholds_come_from(
    trained, shared_cache, tmp_path
):
    from covidct.training.run import train

    source, _ = trained  # a validated run (the session's tiny training)
    runs = {}
    for name, extra in (("defaults", []), ("from_ckpt", [f"vote.from_ckpt={source}"])):
        out = tmp_path / name
        runs[name] = train(compose_train(out, [*tiny(shared_cache), "logger=none", "data.val_fraction=0", *extra]))
        split = list(csv.DictReader((out / "split.csv").open()))
        assert {row["subset"] for row in split} == {"train"} and len(split) == 12  # every patient trains
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]
        assert not (out / "report.html").exists()
        assert runs[name].best_checkpoint.endswith("last.ckpt")
    assert "the rules' defaults" in runs["defaults"].summary("infected_fraction")
    assert vote_state(runs["defaults"].best_checkpoint)["tau"] == 0.5
    given, used = vote_state(source), vote_state(runs["from_ckpt"].best_checkpoint)
    for key in ("tau", "slice_threshold", "threshold_tau", "temperature"):
        assert used[key] == pytest.approx(given[key]), key
    saved = json.loads((tmp_path / "from_ckpt" / "metrics.json").read_text())
    assert str(source) in saved["vote_parameters"] and "vote.from_ckpt" in runs["from_ckpt"].summary(
        "infected_fraction"
    )


def test_from_ckpt_must_hold_a_vote_state(tmp_path):
    from covidct.training.callbacks.patient_vote import PatientVoteCallback

    bogus = tmp_path / "x.ckpt"
    bogus.write_text("not a checkpoint")
    with pytest.raises(Exception, match="vote.from_ckpt"):
        PatientVoteCallback(from_ckpt=str(bogus))
    with pytest.raises(ConfigError, match=r"data.val_fraction must be in \[0, 1\)"):
        from covidct.data.split import check_split

        check_split(1.0, None, 0)
