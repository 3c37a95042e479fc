"""``make bench-growth`` (``python -m covidct.bench 'bench.rows=[growth]'``): does the pipeline stay linear in
the number of patients? Every stage runs at 1x, 2x and 4x a base patient count in one run, in this process, and
the row reports the seconds per patient at 4x over the seconds per patient at 1x (target <= 1.15x: linear or
better), with this process's peak RSS per stage and size.

Stages, each on the data of its size (made by the stage before): ``generate`` (the synthetic dataset,
:func:`~covidct.data.synthetic.ensure_dataset`), ``cache`` (the datamodule's ``prepare_data`` and ``setup``:
discovery, the slice cache, the split), ``train_epoch`` (one Lightning epoch of ``bench.growth.backbone``, every
training slice), ``validate`` (a Lightning validation pass with the patient vote callback, the vote's time taken
out), ``vote`` (:meth:`~covidct.patients.decisions.PatientVoter.decide` on the validation slices, then
:meth:`~covidct.patients.decisions.PatientVoter.fit_mil`: the epoch that pays the run's one MIL fit), ``report``
(the run report of that epoch: :func:`~covidct.training.callbacks.run_report.report_from_votes`, its Grad-CAM and
:func:`~covidct.report.page.write_report`) and ``predict`` (:func:`~covidct.predict.predictor.predict_test_set`
over every generated patient, the class folders as test sets). Cost per patient divides by the patients the
stage works on: all of them, the training or the validation patients.

Sizes (``bench.growth`` in ``conf/bench.yaml``): the default is CI-sized (2 patients per class, 16 slices,
64 px); ``bench.growth.base_patients_per_class=[42,15,19] bench.growth.slices=150 bench.growth.image_size=512``
rehearses the real COVID-CT-MD (4x: 304 patients) with the same code. The peak RSS is this process's (its
DataLoader and cache workers are not counted: the defaults keep the work in this process). Results: a table
(:func:`format_growth`), one :class:`~covidct.bench.measure.Row` per stage, and ``growth`` in ``bench.json``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from covidct.bench.measure import Row, check_backbone, peak_rss_mib, reset_peak_rss
from covidct.errors import ConfigError
from covidct.text_table import format_table

if TYPE_CHECKING:
    from covidct.data.synthetic import SyntheticSpec

log = logging.getLogger("bench")
T = TypeVar("T")

#: the sizes every stage runs at, as multiples of ``bench.growth.base_patients_per_class``
FACTORS: tuple[int, ...] = (1, 2, 4)
#: seconds per patient at the largest size over the smallest: above this a stage grows faster than linearly
TARGET = 1.15
#: stage -> (the patients its cost is per, what is timed)
STAGES: dict[str, tuple[str, str]] = {
    "generate": ("all", "synthetic dataset (ensure_dataset)"),
    "cache": ("all", "datamodule prepare_data + setup (slice cache, split)"),
    "train_epoch": ("train", "1 Lightning training epoch"),
    "validate": ("val", "Lightning validation pass, without the vote"),
    "vote": ("val", "PatientVoter.decide + fit_mil (the run's one MIL fit)"),
    "report": ("val", "run report: report_from_votes, Grad-CAM, write_report"),
    "predict": ("all", "predict_test_set over every patient"),
}


@dataclass
class StageGrowth:
    """One stage at every size of :data:`FACTORS`: the patients it worked on, their slices, its seconds and this
    process's peak RSS (MiB) while it ran."""

    stage: str
    per: str  # the patients counted: all, train or val
    what: str
    patients: list[int] = field(default_factory=list)
    slices: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    peak_rss_mib: list[float] = field(default_factory=list)

    @property
    def s_per_patient(self) -> list[float]:
        return [s / p if p else math.nan for s, p in zip(self.seconds, self.patients, strict=True)]

    @property
    def ratio(self) -> float:
        """Seconds per patient at the largest size over those at the smallest."""
        per = self.s_per_patient
        return per[-1] / per[0] if per[0] else math.nan

    @property
    def ok(self) -> bool:
        return self.ratio <= TARGET

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"s_per_patient": self.s_per_patient, "ratio": self.ratio, "ok": self.ok}


@dataclass
class Measured:
    seconds: float
    peak_rss_mib: float


def measured(fn: Callable[[], T]) -> tuple[T, Measured]:
    """``fn()``'s result, seconds and this process's peak RSS while it ran (garbage collected before)."""
    gc.collect()
    reset_peak_rss()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return out, Measured(seconds, peak_rss_mib())


def base_counts(cfg: DictConfig) -> tuple[int, int, int]:
    """``bench.growth.base_patients_per_class`` as (COVID-19, CAP, Normal): one number for every class, or 3."""
    base = cfg.base_patients_per_class
    counts = tuple(base) if OmegaConf.is_list(base) or isinstance(base, list | tuple) else (base,) * 3
    if len(counts) != 3 or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        raise ConfigError(
            f"bench.growth.base_patients_per_class={base!r}: give a whole number >= 1 or 3 counts >= 0 "
            "(COVID-19, CAP, Normal), e.g. [42,15,19]"
        )
    if sum(counts) < 2:
        raise ConfigError(f"bench.growth.base_patients_per_class={base!r}: at least 2 patients in all")
    return counts  # type: ignore[return-value]


def check_growth(cfg: DictConfig) -> None:
    """A ConfigError naming the ``bench.growth`` key, before any data is made."""
    base_counts(cfg)
    whole = {"slices": (5, 200), "image_size": (32, None), "input_size": (16, None), "batch_size": (1, None)}
    whole |= {"cache_workers": (1, None), "predict_workers": (0, None), "repeats": (1, None)}
    for key, (low, high) in whole.items():
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
            span = f"between {low} and {high}" if high else f">= {low}"
            raise ConfigError(f"bench.growth.{key}={value!r} must be a whole number {span}")
    n = cfg.threads
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"bench.growth.threads={cfg.threads!r} must be a whole number >= 1 or null (as they are)")
    fraction = cfg.val_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise ConfigError(f"bench.growth.val_fraction={fraction!r} must lie between 0 and 1 (both excluded)")
    check_backbone("bench.growth.backbone", cfg.backbone)


def growth_spec(cfg: DictConfig, counts: tuple[int, int, int]) -> SyntheticSpec:
    """The synthetic dataset of one size: ``counts`` patients per class, ``bench.growth.slices`` slices each at
    ``bench.growth.image_size`` px, every series JPEG Lossless (as the real data)."""
    from covidct.data.synthetic import SyntheticSpec

    return SyntheticSpec(
        patients_per_class=counts,
        slices_min=cfg.slices,
        slices_max=cfg.slices,
        image_size=cfg.image_size,
        compressed_fraction=1.0,
        seed=0,
    )


def measure_size(cfg: DictConfig, counts: tuple[int, int, int], work: Path) -> dict[str, tuple[int, int, Measured]]:
    """Every stage once on a dataset of ``counts`` patients per class, made in ``work`` (removed after):
    stage -> (patients, slices, measured)."""
    import pytorch_lightning as pl

    from covidct.bench.loading import training_augmentation
    from covidct.bench.training import new_model
    from covidct.contracts import CLASS_NAMES
    from covidct.data.datamodule import CTDataModule
    from covidct.data.synthetic import ensure_dataset
    from covidct.predict.predictor import predict_test_set
    from covidct.predict.settings import PredictorSettings, vote_fields
    from covidct.predict.test_sets import find_test_sets
    from covidct.report.page import write_report
    from covidct.training.callbacks.patient_vote import PatientVoteCallback
    from covidct.training.callbacks.run_report import RunReportCallback, data_counts, report_from_votes

    class TimedVote(PatientVoteCallback):
        """The patient vote callback, its :meth:`decide` and the MIL fit of that epoch timed apart (and the
        forward's peak RSS before them)."""

        vote: Measured | None = None
        forward_peak_mib = math.nan

        def decide(self, *args: Any, **kwargs: Any):
            self.forward_peak_mib = peak_rss_mib()
            out, self.vote = measured(lambda: self.fit_mil(super(TimedVote, self).decide(*args, **kwargs)))
            return out

    def trainer(**kwargs: Any) -> pl.Trainer:
        quiet = {"enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}
        return pl.Trainer(accelerator="cpu", devices=1, logger=False, num_sanity_val_steps=0, **quiet, **kwargs)

    results: dict[str, tuple[int, int, Measured]] = {}
    try:
        root, gen = measured(lambda: ensure_dataset(work / "data", growth_spec(cfg, counts)))
        dm = CTDataModule(
            root=str(root),
            cache_dir=str(work / "cache"),
            image_size=cfg.input_size,
            val_fraction=cfg.val_fraction,
            batch_size=cfg.batch_size,
            num_workers=0,
            train_transforms=training_augmentation().transforms,
            cache_workers=cfg.cache_workers,
            seed=0,
        )
        _, cache = measured(lambda: (dm.prepare_data(), dm.setup("fit")))
        dm.prepare_data = lambda: None  # prepared: fit and validate would discover the patients again
        n_all, slices_all = len(dm.patient_ids), len(dm.slice_table.patient)
        results["generate"] = (n_all, slices_all, gen)
        results["cache"] = (n_all, slices_all, cache)

        model = new_model(dm, cfg)
        _, train = measured(lambda: trainer(max_epochs=1, limit_val_batches=0).fit(model, datamodule=dm))
        results["train_epoch"] = (len(dm.train_patients), len(dm.train_rows), train)

        vote = TimedVote()
        validator = trainer(callbacks=[vote])
        _, validation = measured(lambda: validator.validate(model, datamodule=dm, verbose=False))
        votes = vote.best
        if vote.vote is None or votes is None:
            raise RuntimeError("the growth row's validation pass voted no patient")
        n_val, slices_val = len(dm.val_patients), len(dm.val_rows)
        forward = Measured(validation.seconds - vote.vote.seconds, vote.forward_peak_mib)
        results["validate"] = (n_val, slices_val, forward)
        results["vote"] = (n_val, slices_val, vote.vote)

        def report() -> None:
            data, note = data_counts(dm)
            history = [{"epoch": 0, "train_loss": math.nan, "val_loss": math.nan, "val_patient_acc": votes.score}]
            report = report_from_votes(
                votes, dm.slice_table.target, "growth", vote, history=history, data=data, data_note=note
            )
            report.cams = RunReportCallback(str(work / "run")).report_cams(validator, model, votes, report)
            write_report(report, work / "run")

        _, rendering = measured(report)
        results["report"] = (n_val, slices_val, rendering)

        settings = PredictorSettings(["lung"], cfg.input_size, list(CLASS_NAMES), **vote_fields(vote.parameters))
        model.eval()

        def predict() -> int:
            test_sets = find_test_sets(root)
            for t in test_sets:
                predict_test_set(t, model, settings, work / "predicted", 64, cfg.predict_workers, progress=False)
            return sum(len(t.patients) for t in test_sets)

        predicted, prediction = measured(predict)
        if predicted != n_all:
            raise RuntimeError(f"predict read {predicted} patient folders, the datamodule {n_all}")
        results["predict"] = (predicted, slices_all, prediction)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def measure_growth(cfg: DictConfig, work: Path) -> list[StageGrowth]:
    """Every stage of :data:`STAGES` at each size of :data:`FACTORS`, ``cfg.repeats`` times (the sizes smallest
    first, then largest first, alternating against drift in the machine's load; per stage and size the fewest
    seconds and the largest peak RSS count), after an unrecorded warm-up pass on 2 patients per class when
    ``cfg.warm_up`` (imports, kernels, fonts: one-time costs that would weigh on the first size only); torch and
    OpenCV run ``cfg.threads`` threads meanwhile."""
    check_growth(cfg)
    with threads(cfg.threads):
        return _measure_growth(cfg, work)


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """torch's and OpenCV's threads set to ``n`` (None: left as they are) inside, restored after."""
    import cv2
    import torch

    before = torch.get_num_threads(), cv2.getNumThreads()
    if n is not None:
        torch.set_num_threads(n)
        cv2.setNumThreads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


def _measure_growth(cfg: DictConfig, work: Path) -> list[StageGrowth]:
    base = base_counts(cfg)
    if cfg.warm_up:
        log.info("growth: warm-up pass (2 patients per class, not recorded)")
        measure_size(OmegaConf.merge(cfg, {"slices": min(cfg.slices, 16)}), (2, 2, 2), work / "warm-up")
    best: dict[tuple[str, int], tuple[int, int, Measured]] = {}
    for repeat in range(cfg.repeats):
        for factor in FACTORS if repeat % 2 == 0 else FACTORS[::-1]:
            counts = (base[0] * factor, base[1] * factor, base[2] * factor)
            log.info("growth: %dx, %s patients per class, repeat %d/%d", factor, list(counts), repeat + 1, cfg.repeats)
            for name, (patients, slices, m) in measure_size(cfg, counts, work / f"x{factor}").items():
                earlier = best.get((name, factor))
                if earlier is not None:
                    fastest = min(m.seconds, earlier[2].seconds)
                    m = Measured(fastest, max(m.peak_rss_mib, earlier[2].peak_rss_mib))
                best[name, factor] = (patients, slices, m)
    stages = []
    for name, (per, what) in STAGES.items():
        sizes = [best[name, factor] for factor in FACTORS]
        stages.append(
            StageGrowth(
                name,
                per,
                what,
                [p for p, _, _ in sizes],
                [s for _, s, _ in sizes],
                [m.seconds for _, _, m in sizes],
                [m.peak_rss_mib for _, _, m in sizes],
            )
        )
    return stages


def format_growth(stages: list[StageGrowth]) -> str:
    """The growth table: per stage the patients counted, seconds and seconds per patient at every size, the
    ratio (largest size over smallest, per patient; ``NO`` in ``linear`` above :data:`TARGET`) and the peak RSS."""
    sizes = [f"{f}x" for f in FACTORS]
    header = [
        "stage",
        "per",
        "patients",
        *[f"s {s}" for s in sizes],
        *[f"s/patient {s}" for s in sizes],
        f"{sizes[-1]}/{sizes[0]}",
        f"linear (<= {TARGET}x)",
        "peak RSS MiB",
    ]
    rows = [
        [
            g.stage,
            g.per,
            "/".join(str(p) for p in g.patients),
            *[f"{s:.3g}" for s in g.seconds],
            *[f"{s:.3g}" for s in g.s_per_patient],
            f"{g.ratio:.3g}x",
            "yes" if g.ok else "NO",
            "/".join(f"{r:.0f}" for r in g.peak_rss_mib),
        ]
        for g in stages
    ]
    return format_table(header, rows)


def growth_report(cfg: DictConfig, stages: list[StageGrowth]) -> dict[str, Any]:
    """``bench.json``'s ``growth``: the sizes, the CPU and every stage's figures."""
    from covidct.bench.predict import machine

    return {
        "factors": list(FACTORS),
        "base_patients_per_class": list(base_counts(cfg)),
        "target": TARGET,
        "repeats": cfg.repeats,
        "threads": cfg.threads,
        "machine": machine(),
        "stages": [g.as_dict() for g in stages],
    }


def growth_rows(cfg: DictConfig, work: Path, report: dict[str, Any] | None = None) -> list[Row]:
    """``make bench``'s rows for ``growth``: per stage seconds per patient at the largest size vs the smallest
    (target <= :data:`TARGET`); the table is logged, and ``report`` (when given) gets ``growth``
    (:func:`growth_report`) and ``growth_table``."""
    stages = measure_growth(cfg, work)
    table = format_growth(stages)
    log.info("growth, seconds per patient at %dx vs %dx:\n%s", FACTORS[-1], FACTORS[0], table)
    if report is not None:
        report["growth"] = growth_report(cfg, stages)
        report["growth_table"] = table
    data = f"synthetic {cfg.slices} slices x {cfg.image_size} px, {cfg.backbone} {cfg.input_size} px"
    return [
        Row(
            f"growth {g.stage}",
            f"{data}, {g.per} patients {'/'.join(str(p) for p in g.patients)}",
            f"s/patient {FACTORS[-1]}x",
            g.s_per_patient[-1],
            f"s/patient {FACTORS[0]}x",
            g.s_per_patient[0],
            "s/patient",
            f"<= {TARGET}x",
            g.ok,
        )
        for g in stages
    ]
