"""Validate one checkpoint with the patient vote: ``python tests/ddp_eval_script.py OUT CKPT [override ...]``.

Run by ``tests/test_ddp.py`` in a subprocess, once in one process and once with ``trainer=ddp_cpu``,
for which Lightning starts rank 1 by running this file again. Every rank writes ``OUT/rank<r>.json``
(its slices before and after the gather, the patient votes, the logged metrics); the
PatientVoteCallback writes ``OUT/patients.csv`` (from rank 0 only).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(out_dir: Path, ckpt_path: str, overrides: list[str]) -> None:
    import pytorch_lightning as pl
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from covidct.config import register_resolvers
    from covidct.predict.torch_backend import load_checkpoint
    from covidct.training.callbacks.patient_vote import PatientVoteCallback

    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        # paths.output_dir is given: no Hydra run, so Lightning re-runs this file as it is
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={out_dir}", "logger=none"])
    pl.seed_everything(cfg.seed)
    datamodule = instantiate(cfg.data, _convert_="all")
    model, _ = load_checkpoint(ckpt_path, torch.device("cpu"))
    vote = PatientVoteCallback(cfg.vote.rule, cfg.vote.tau, str(out_dir))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[vote], logger=False, enable_checkpointing=False)
    trainer.validate(model, datamodule=datamodule)

    best = vote.best
    result = {
        "world_size": trainer.world_size,
        "rank_slices": sum(len(batch[0]) for batch in vote._batches),  # this rank's share, padding included
        "val_rows": len(datamodule.val_rows),
        "index": best.slice_rows.tolist(),
        "patient": best.slice_patient.tolist(),
        "probs": best.slice_probs.tolist(),
        "votes": [
            {
                "patient": v.patient,
                "votes": v.votes.tolist(),
                "rule_votes": v.rule_votes,
                "infected_fraction": v.infected_fraction,
                "infected_class": v.infected_class,
                "n_slices": v.n_slices,
            }
            for v in best.patients
        ],
        "predictions": best.predicted.tolist(),
        # what Lightning logged (val/*) and what the vote gave the loggers directly (rules/*, vote/*, calibration/*)
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}
        | {k: float(v) for k, v in best.metrics.items()},
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
