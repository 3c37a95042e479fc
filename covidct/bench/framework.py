"""Where does the time go? ``make bench`` (``python -m covidct.bench [bench.scale=4]``).

Every row compares two ways of doing the same work, on the same data, in the same run (this machine
is shared and noisy: only ratios measured side by side mean anything) and reports the ratio:

1. loader: model-ready slices/s (augmentation on) from the slice cache vs decoding DICOM every
   epoch vs the paper's route (DICOM converted once to JPEG files, JPEGs decoded every epoch);
2. cache build: slices/s with N worker processes vs one process vs raw ``pydicom`` decode (the floor);
   and (real sample) seconds with ``data.lung_crop=true`` vs without (target: at most 1.5x);
3. framework: Lightning epochs (our module and vote callback, metrics, CSV logging; checkpoints off,
   their disk writes are the same in any loop) vs a hand-written PyTorch loop over the same
   batches, model and optimizer; the vote's one MIL fit at the end of a run (like the report: once per
   run, not epoch work) is timed apart and shown beside the ratio;
4. precision: Lightning epochs on the CPU in ``bf16-mixed`` vs ``32-true`` (same model, batches, optimizer); passes
   when bf16 is faster and the two models agree on the validation slices (accuracy, argmax calls);
5. memory: peak RSS of a training run on N vs 10N slices (the cache is read, never loaded);
6. inference: predict.py per patient vs a bare forward over the same slices;
7. growth (not in the default rows: ``make bench-growth``): every pipeline stage at 1x, 2x and 4x a base patient
   count, seconds per patient at 4x vs 1x (:mod:`covidct.bench.growth`).

Data rows use the synthetic generator at real size (512 x 512, JPEG Lossless); rows marked "real"
use the 3-patient COVID-CT-MD sample. Results: a table on stdout and ``<run dir>/bench.json``.

This module runs the rows and writes the report; the rows are measured in :mod:`covidct.bench.loading`
(1, 2), :mod:`covidct.bench.training` (3, 4, 5), :mod:`covidct.bench.predict` (6) and :mod:`covidct.bench.growth`
(7). Importing it only defines things: each row imports the libraries it needs, and the process setup
(environment, resolvers) happens in :func:`main`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from covidct.bench.measure import Row, check_backbone, format_rows
from covidct.contracts import CONF_DIR, INDEX_FILE
from covidct.errors import ConfigError, CovidCTError
from covidct.io import atomic_write_text

if TYPE_CHECKING:
    from covidct.data.preprocess import SlicePreprocessor

log = logging.getLogger("bench")
BENCH_ROWS = ("loader", "cache_build", "cache_lung_crop", "framework", "precision", "memory", "inference", "growth")


def environment() -> dict[str, Any]:
    """The machine, library versions and this process's peak RSS (MiB), for ``bench.json``."""
    import torch

    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "max_rss_mib_of_bench": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def row_key(step_name: str) -> str:
    """``"cache build (real)"`` -> ``"cache_build"`` (the name ``bench.rows`` uses)."""
    return step_name.removesuffix(" (real)").replace(" ", "_")


def check_bench(cfg: DictConfig) -> None:
    """Fail before any data is made, naming the key, on the values only the bench reads."""
    rows = cfg.rows
    if not OmegaConf.is_list(rows):
        raise ConfigError(f"bench.rows={rows!r} must be a list, e.g. bench.rows=[framework]")
    unknown = set(rows) - set(BENCH_ROWS)
    if unknown:
        raise ConfigError(f"bench.rows has unknown rows {sorted(unknown)}; choose from {list(BENCH_ROWS)}")
    scale = cfg.scale
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ConfigError(f"bench.scale={scale!r} must be a whole number >= 1")
    for row in ("framework", "precision", "inference"):
        if row in rows:
            check_backbone(f"bench.{row}.backbone", cfg[row].backbone)
    if "precision" in rows:
        tolerance = cfg.precision.metric_tolerance
        if not isinstance(tolerance, int | float) or isinstance(tolerance, bool) or not tolerance >= 0:
            raise ConfigError(f"bench.precision.metric_tolerance={tolerance!r} must be a number >= 0 (e.g. 0.05)")
    if "growth" in rows:
        from covidct.bench.growth import check_growth

        check_growth(cfg.growth)


def run_bench(cfg: DictConfig, output_dir: Path, extra: dict[str, Any] | None = None) -> list[Row]:
    """All rows for ``cfg`` (the ``bench`` node); writes ``bench.json`` into ``output_dir``. ``extra`` (when given)
    receives the sections ``bench.json`` has beside the rows (``precision``, ``growth``, ``growth_table``)."""
    from covidct.data.preprocess import SlicePreprocessor, parse_windows

    check_bench(cfg)
    pre = SlicePreprocessor(parse_windows(list(cfg.windows), key="bench.windows"), cfg.image_size)
    work = Path(tempfile.mkdtemp(prefix="covidct-bench-"))
    started = time.perf_counter()
    rows: list[Row] = []
    extra = {} if extra is None else extra
    try:
        steps = []
        if set(cfg.rows) - {"growth"}:  # their data is generated first; growth makes its own
            steps = [(name, step) for name, step in bench_steps(cfg, pre, work, extra) if row_key(name) in cfg.rows]
        if "growth" in cfg.rows:
            from covidct.bench.growth import growth_rows

            steps.append(("growth", lambda: growth_rows(cfg.growth, work / "growth", extra)))
        for name, step in steps:
            log.info("Measuring %s ...", name)
            new = step()
            rows += new
            log.info("\n%s", format_rows(new))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "rows": [asdict(r) | {"ratio": r.ratio} for r in rows],
        **{k: v for k, v in extra.items() if k != "growth_table"},
        "environment": environment(),
        "bench": OmegaConf.to_container(cfg, resolve=True),
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_text(output_dir / "bench.json", json.dumps(report, indent=2) + "\n")
    return rows


def bench_steps(
    cfg: DictConfig, pre: SlicePreprocessor, work: Path, extra: dict[str, Any] | None = None
) -> list[tuple[str, Callable[[], list[Row]]]]:
    """(name, measure) of every row, in order, on the synthetic data (generated here, at ``bench.scale``) and,
    when ``bench.real_sample`` holds one, the real sample; ``work``: a scratch folder; ``extra``: receives the
    sections ``bench.json`` has beside the rows."""
    from covidct.bench.loading import measure_cache_build, measure_loaders, measure_lung_crop, slice_files
    from covidct.bench.predict import measure_inference
    from covidct.bench.training import measure_framework, measure_memory, measure_precision
    from covidct.data.layout import discover_covid_ct_md
    from covidct.data.synthetic import SyntheticSpec, ensure_dataset

    scale = cfg.scale
    cache_dir = Path(cfg.cache_dir)
    spec = SyntheticSpec(
        patients_per_class=(cfg.data.patients_per_class * scale,) * 3,
        slices_min=cfg.data.slices,
        slices_max=cfg.data.slices,
        image_size=512,
        compressed_fraction=1.0,
        seed=0,
    )
    root = ensure_dataset(cache_dir, spec)
    synthetic = discover_covid_ct_md(root)
    data = f"synthetic 512 px JPEG-LS, {len(slice_files(synthetic))} slices"
    builds = cfg.cache_build
    steps: list[tuple[str, Callable[[], list[Row]]]] = [
        ("loader", lambda: measure_loaders(synthetic, pre, cfg, work / "syn", data, with_jpeg=True)),
        ("cache build", lambda: measure_cache_build(synthetic, pre, builds.workers, work, data, builds.repeats)),
    ]
    sample = Path(cfg.real_sample)
    if (sample / INDEX_FILE).is_file():
        real = discover_covid_ct_md(sample)
        real_data = f"real sample, {len(slice_files(real))} slices"
        crop = cfg.cache_lung_crop
        steps += [
            ("loader (real)", lambda: measure_loaders(real, pre, cfg, work / "real", real_data, with_jpeg=False)),
            (
                "cache build (real)",
                lambda: measure_cache_build(real, pre, builds.workers, work, real_data, builds.repeats),
            ),
            (
                "cache lung crop (real)",
                lambda: measure_lung_crop(real, pre, crop.workers, work, real_data, crop.repeats),
            ),
        ]
    else:
        log.warning("Real sample not found at %s: its rows are skipped (bench.real_sample=...)", sample)
    memory = OmegaConf.merge(cfg.memory, {"patients_per_class": cfg.memory.patients_per_class * scale})
    steps += [
        ("framework", lambda: measure_framework(root, cfg.framework, work / "framework", "synthetic")),
        ("precision", lambda: measure_precision(root, cfg.precision, work / "precision", "synthetic", extra)),
        ("memory", lambda: measure_memory(memory, cache_dir, work / "memory")),
    ]
    if (sample / INDEX_FILE).is_file():
        steps.append(("inference", lambda: measure_inference(sample, cfg.inference)))
    return steps


# ---- command line -------------------------------------------------------------------------------
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
def bench_app(cfg: DictConfig) -> None:
    output_dir = Path(cfg.paths.output_dir)
    extra: dict[str, Any] = {}
    try:
        rows = run_bench(cfg.bench, output_dir, extra)
    except CovidCTError as exc:
        log.error("%s", exc)
        sys.exit(1)  # noqa: B904 (the message names the key; no traceback for user errors)
    env = environment()
    print(
        f"covidct bench on {env['cpus']} CPUs ({env['torch_threads']} torch threads), GPU: {env['gpu']}; "
        f"A/B measured side by side in this run"
    )
    print(format_rows(rows))
    if "growth_table" in extra:
        print(f"growth: each stage at 1x, 2x, 4x the patients; s/patient 4x over 1x\n{extra['growth_table']}")
    print(f"figures: {output_dir / 'bench.json'}")


def main() -> None:
    """``python -m covidct.bench [key=value ...]``: process setup (here, not at import), then Hydra."""
    from covidct.config import register_resolvers

    register_resolvers()  # ${run_suffix:} names the run folder
    bench_app()


if __name__ == "__main__":
    main()
