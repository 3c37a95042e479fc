"""The benchmark's code paths on tiny sizes (every row, bench.json). No timing is asserted."""

from __future__ import annotations

import json
import math

import pytest
from hydra import compose, initialize_config_dir

from covidct.bench import run_bench
from covidct.config import register_resolvers
from covidct.data.synthetic import SyntheticSpec, ensure_dataset
from covidct.errors import ConfigError
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_every_row_runs_on_tiny_data_and_lands_in_bench_json(tmp_path):
    # a tiny stand-in for the real sample, so its rows (loader, cache build, inference) run too
    stand_in = ensure_dataset(tmp_path / "stand-in", SyntheticSpec(patients_per_class=(1, 1, 1), slices_min=6,
                                                                   slices_max=6, image_size=96))
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("bench", overrides=[
            f"paths.cache_dir={tmp_path / 'cache'}", f"bench.real_sample={stand_in}",
            "bench.data.patients_per_class=2", "bench.data.slices=6", "bench.image_size=64",
            "bench.loader.num_workers=0", "bench.cache_build.workers=2",
            "bench.framework.epochs=1", "bench.framework.repeats=1", "bench.framework.image_size=32",
            "bench.memory.patients_per_class=2", "bench.memory.slices=6", "bench.memory.image_size=64",
            "bench.memory.batches=1", "bench.inference.backbone=resnet18", "bench.inference.image_size=64",
            "bench.inference.num_workers=0", "bench.inference.patients=2",
        ])
    rows = run_bench(cfg.bench, tmp_path / "out")
    names = [(r.name, r.b_label) for r in rows]
    assert names == [
        ("loader", "DICOM every epoch"), ("loader", "JPEG files (paper)"),
        ("cache build", "raw pydicom decode"), ("cache build", "1 process"),
        ("loader", "DICOM every epoch"), ("cache build", "raw pydicom decode"), ("cache build", "1 process"),
        ("framework", "hand-written loop"), ("memory", "peak RSS N"), ("inference", "bare forward"),
    ]
    assert all(r.a > 0 and r.b > 0 and math.isfinite(r.ratio) for r in rows)
    assert "36 slices" in rows[0].data and "18 slices" in rows[4].data  # 2 x 3 x 6 synthetic, 3 x 6 stand-in
    assert "36 vs 360 slices" in rows[8].data  # N vs 10N
    assert "2 patients, 12 slices" in rows[9].data
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert len(report["rows"]) == len(rows) and report["environment"]["cpus"] >= 1
    assert report["rows"][0]["ratio"] == pytest.approx(rows[0].ratio)


def test_rows_selects_rows_and_names_unknown_ones(tmp_path):
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        overrides = [f"paths.cache_dir={tmp_path / 'cache'}", f"bench.real_sample={tmp_path / 'absent'}",
                     "bench.data.patients_per_class=2", "bench.data.slices=4", "bench.image_size=32",
                     "bench.framework.epochs=1", "bench.framework.repeats=3", "bench.framework.image_size=32"]
        cfg = compose("bench", overrides=[*overrides, "bench.rows=[framework]"])
        bad = compose("bench", overrides=[*overrides, "bench.rows=[framwork]"])
    rows = run_bench(cfg.bench, tmp_path / "out")
    assert [r.name for r in rows] == ["framework"] and "median of 3 pairs" in rows[0].data
    with pytest.raises(ConfigError, match=r"bench.rows.*'framwork'"):
        run_bench(bad.bench, tmp_path / "out2")
