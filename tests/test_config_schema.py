"""The config schema and value checks: wrong types and values fail while composing or before any
data is read, naming the key; experiment and launcher configs compose to what they promise."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import MISSING, OmegaConf

from covidct.config import check_config, register_resolvers
from covidct.data.synthetic import SyntheticSpec
from covidct.errors import ConfigError
from covidct.patients.rules import LEARNED_RULES, VOTE_RULES
from covidct.schema import DataConfig, TrainConfig
from covidct.training.run import build_run
from tests.conftest import REPO, compose_train


def composition_error(tmp_path, overrides: list[str]) -> str:
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(tmp_path, overrides)
    return f"{err.value} {err.value.__cause__}"


def test_the_composed_config_is_typed_by_the_schema(tmp_path):
    cfg = compose_train(tmp_path, [])
    assert OmegaConf.get_type(cfg.data) is DataConfig
    assert cfg.data.image_size == 64 and cfg.model.backbone == "resnet18"  # the demo experiment
    check_config(cfg)  # the defaults are valid
    run = build_run(cfg)  # and every constructor accepts them
    assert run.model.hparams.in_channels == 1 and run.model.hparams.preprocessing["vote_rule"] == "infected_fraction"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.image_size=abc", "data.image_size"),
        ("data.batch_size=1.5", "data.batch_size"),
        ("model.pretrained=maybe", "model.pretrained"),
        ("loss.gama=2", "loss.gama"),  # a typo is an unknown key, not a new one
        ("loss=ce", "loss.gamma=2"),  # cross-entropy has no gamma
        ("data.windos=[lung]", "data.windos"),
        ("vote.k=five", "vote.k"),
        ("vote.center_slices=1.5", "vote.center_slices"),
    ],
)
def test_wrong_types_and_unknown_keys_fail_while_composing(tmp_path, override, expected):
    overrides = override.split(" ") if " " in override else [override]
    if override == "loss=ce":
        overrides = ["loss=ce", "loss.gamma=2"]
    assert expected.split("=")[0] in composition_error(tmp_path, overrides)


def test_an_unknown_group_choice_lists_the_choices(tmp_path):
    with pytest.raises(MissingConfigException) as err:
        compose_train(tmp_path, ["model=vgg61"])
    assert all(name in str(err.value) for name in ("vgg16", "vgg16_bn", "resnet18", "efficientnet_b0"))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["loss.gamma=-1"], "loss.gamma must be >= 0"),
        (["loss.gamma=strong"], "loss.gamma must be a number"),
        (["loss.alpha=[0.2,0.3]"], "loss.alpha has 2 values"),
        (["loss.alpha=1.5"], "loss.alpha must be in [0, 1]"),
        (["vote.rule=median"], "vote.rule='median' is not known"),
        (["vote.tau=2"], "vote.tau must be in [0, 1]"),
        (["vote.rule=foo"], "vote.rule='foo' is not known"),
        (["vote=topk_mean", "vote.k=0"], "vote.k must be an integer >= 1"),
        (["vote=weighted_center", "vote.center_slices=-4"], "vote.center_slices must be an integer >= 1"),
        (["data.label_mode=slice"], "data.label_mode='slice' is not known"),
        (["data.image_size=16"], "data.image_size must be an integer >= 32"),
        (["data.val_fraction=1.0"], "data.val_fraction must be in [0, 1)"),
        (["data.num_folds=5", "data.fold=5"], "0 <= data.fold < data.num_folds"),
        (["data=covid_ct_md"], "data.root is not set"),
        (["data=covid_ct_md", "data.root=/no/such/folder"], "data.root='/no/such/folder' is not a folder"),
        (["optimizer.lr=-0.1"], "optimizer.lr must be a positive number"),
        (["model.backbone=vgg61"], "model.backbone='vgg61' is not known"),
    ],
)
def test_bad_values_fail_before_data_is_read_naming_the_key(tmp_path, overrides, expected):
    cfg = compose_train(tmp_path, [*overrides, "logger=none", f"paths.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
        build_run(cfg)  # each constructor checks its own values
    assert expected in str(err.value)
    assert not (tmp_path / "cache").exists()  # no data was generated or read


def test_every_vote_rule_has_a_config_file():
    assert sorted(p.stem for p in (REPO / "conf" / "vote").glob("*.yaml")) == sorted(VOTE_RULES + LEARNED_RULES)


@pytest.mark.parametrize("rule", VOTE_RULES)
def test_every_vote_rule_composes(tmp_path, rule):
    cfg = compose_train(tmp_path, [f"vote={rule}"])
    assert (cfg.vote.rule, cfg.vote.k, cfg.vote.center_slices) == (rule, 5, 40)
    check_config(cfg)


def test_vote_parameters_override(tmp_path):
    cfg = compose_train(tmp_path, ["vote=topk_mean", "vote.k=3", "vote.center_slices=30"])
    assert (cfg.vote.rule, cfg.vote.k, cfg.vote.center_slices) == ("topk_mean", 3, 30)


def test_paper_experiment_is_the_papers_recipe(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=paper", f"data.root={tmp_path}"])
    assert cfg.model.backbone == "vgg16" and cfg.model.pretrained is True
    assert (cfg.loss._target_, cfg.loss.gamma, cfg.loss.alpha) == ("covidct.models.losses.FocalLoss", 2.0, 0.25)
    assert list(cfg.data.windows) == ["lung"] and cfg.data.image_size == 224
    assert cfg.data.label_mode == "paper" and cfg.vote.rule == "majority"
    assert cfg.data.synthetic is None and cfg.data.root == str(tmp_path)
    assert "paper" in cfg.tags
    check_config(cfg)


@pytest.mark.parametrize(
    ("experiment", "changed"),
    [
        (
            "paper_ce",
            {"loss._target_": "covidct.models.losses.CrossEntropyLoss", "loss.gamma": None, "loss.alpha": None},
        ),
        ("paper_patient_labels", {"data.label_mode": "patient"}),
        ("paper_infected_fraction", {"vote.rule": "infected_fraction"}),
    ],
)
def test_paper_variants_change_one_thing(tmp_path, experiment, changed):
    paper = compose_train(tmp_path, ["experiment=paper", f"data.root={tmp_path}"])
    variant = compose_train(tmp_path, [f"experiment={experiment}", f"data.root={tmp_path}"])
    for key, value in changed.items():
        assert OmegaConf.select(variant, key) == value != OmegaConf.select(paper, key)
    unresolved = lambda cfg, key: OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=False)  # noqa: E731
    for key in ("model", "optimizer"):  # the model's preprocessing interpolates data and vote: as written
        assert unresolved(variant, key) == unresolved(paper, key)
    for key in ("data.windows", "data.image_size", "trainer.max_epochs"):
        assert OmegaConf.select(variant, key) == OmegaConf.select(paper, key)


def test_spgc_winner_experiment_is_the_winners_recipe_in_two_stages(tmp_path):
    from covidct.training.run import instantiate_checked

    cfg = compose_train(tmp_path, ["experiment=spgc_winner", f"data.root={tmp_path}"])
    assert (cfg.model.backbone, cfg.model.pretrained, cfg.loss._target_) == (
        "efficientnet_b5",
        True,
        "covidct.models.losses.CrossEntropyLoss",
    )
    assert OmegaConf.to_container(cfg.data.windows) == [{"level": -500, "width": 1300}]  # [-1150, 150] HU
    assert (cfg.data.image_size, cfg.data.batch_size, cfg.data.label_mode) == (512, 10, "pseudo")
    assert (cfg.optimizer.lr, list(cfg.optimizer.betas)) == (2e-4, [0.5, 0.999])
    assert (cfg.vote.rule, cfg.vote.center_slices, cfg.vote.window_slices) == ("weighted_center", 40, 80)
    assert list(cfg.model.class_names) == ["COVID-19", "CAP", "Normal"] and cfg.model.num_classes == 3
    with pytest.raises(ConfigError, match="data.label_mode=pseudo needs data.pseudo_labels"):
        instantiate_checked(cfg.data, _convert_="all")  # stage 2 without stage 1's pseudo-labels: what to do
    stage1 = compose_train(tmp_path, ["experiment=spgc_winner", "stage=infection", f"data.root={tmp_path}"])
    assert stage1.data.label_mode == "infection" and list(stage1.model.class_names) == ["clean", "infected"]
    assert stage1.model.num_classes == 2 and stage1.callbacks.model_checkpoint.monitor == "val/infection/auroc"
    assert "patient_vote" not in stage1.callbacks
    for key in ("data.windows", "data.image_size", "model.backbone", "optimizer"):  # both stages alike
        assert OmegaConf.select(stage1, key) == OmegaConf.select(cfg, key)


def test_command_line_wins_over_the_experiment(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=paper", "model=resnet18", "loss.gamma=1", "data.image_size=128"])
    assert (cfg.model.backbone, cfg.loss.gamma, cfg.data.image_size) == ("resnet18", 1.0, 128)


def compose_with_hydra(overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_optuna_search_config(tmp_path):
    cfg = compose_with_hydra(["hparams_search=focal_optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.max_failure_rate == 1.0
    assert set(sweeper.params) == {"loss.gamma", "loss.alpha", "optimizer.lr", "optimizer.weight_decay"}


def test_slurm_launcher_config(tmp_path):
    cfg = compose_with_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.nodes, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 2, 1, 240)


@pytest.mark.slow  # seconds on 2 cores: keeps make test-fast under a minute
def test_cpu_trainer_takes_bf16_mixed_exactly_where_the_cpu_has_it_natively(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from covidct import hardware

    for native, precision in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(hardware, "cpu_bf16", lambda native=native: (native, "stated"))
        OmegaConf.clear_resolver("cpu_precision")  # cached per process: registered again for each answer
        cfg = compose_train(tmp_path, ["trainer=cpu"])
        assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("cpu", precision)
    OmegaConf.clear_resolver("cpu_precision")
    monkeypatch.undo()
    compose_train(tmp_path, [])  # registers it again, unpatched, for the tests after this one


def test_gpu_trainer_config_is_ready_for_a_gpu(tmp_path):
    cfg = compose_train(tmp_path, ["trainer=gpu", "compile.enabled=true"])
    assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.trainer.benchmark) == ("gpu", "bf16-mixed", True)
    assert cfg.model.channels_last is True and cfg.compile.enabled is True
    assert cfg.data.num_workers is None and cfg.data.pin_memory is None  # auto: decided by the data module


@pytest.mark.slow  # a few seconds: keeps make test-fast under 2 min
def test_synthetic_schema_is_made_from_the_generator_spec_and_the_yaml_agrees(tmp_path):
    """``data.synthetic`` is typed by a schema made from the frozen SyntheticSpec it feeds: the same keys
    and defaults (tuples as lists), conf/data/synthetic.yaml sets the same values, overrides and type
    errors work on every key, and the composed node builds the spec."""
    from dataclasses import asdict, fields

    from covidct.data.synthetic import SyntheticSpec
    from covidct.schema import SyntheticConfig

    spec = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(SyntheticSpec()).items()}
    assert asdict(SyntheticConfig()) == spec
    cfg = compose_train(tmp_path, [])
    assert OmegaConf.get_type(cfg.data.synthetic) is SyntheticConfig
    assert OmegaConf.to_container(cfg.data.synthetic) == spec  # the YAML repeats the spec's defaults
    assert SyntheticSpec(**OmegaConf.to_container(cfg.data.synthetic)) == SyntheticSpec()
    cfg = compose_train(tmp_path, ["data.synthetic.patients_per_class=[2,2,2]", "data.synthetic.seed=3"])
    built = SyntheticSpec(**OmegaConf.to_container(cfg.data.synthetic))
    assert (built.patients_per_class, built.seed) == ((2, 2, 2), 3)
    for f in fields(SyntheticSpec):
        assert f"data.synthetic.{f.name}" in composition_error(tmp_path, [f"data.synthetic.{f.name}=abc"])
    assert "data.synthetic.slice_min" in composition_error(tmp_path, ["data.synthetic.slice_min=8"])  # a typo


def _group_choices() -> list[tuple[str, str]]:
    """(group, choice) for every YAML file of every config group the train config composes."""
    skip = {"hydra", "hparams_search", "bench", "bench_predict"}
    return [
        (g.name, f.stem)
        for g in sorted((REPO / "conf").iterdir())
        if g.is_dir() and g.name not in skip
        for f in sorted(g.glob("*.yaml"))
    ]


def _dotted_keys(node: object, prefix: str = "") -> set[str]:
    """Every leaf key of a YAML file's mapping, dotted (``data.synthetic.patient_shift``)."""
    if not OmegaConf.is_dict(node):
        return {prefix[:-1]}
    return {k for key, value in node.items() for k in _dotted_keys(value, f"{prefix}{key}.")}


def _schema_defaults(schema: type, prefix: str = "") -> dict[str, object]:
    """Dotted key -> default, for every field of the schema dataclasses that has a value, not MISSING."""
    found: dict[str, object] = {}
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            found |= _schema_defaults(type(default), key + ".")
        elif default not in (MISSING, dataclasses.MISSING):
            found[key] = default
        if isinstance(f.type, str) and (nested := _nested_schema(schema, f.name)) is not None:
            found |= _schema_defaults(nested, key + ".")
    return found


def _nested_schema(schema: type, name: str) -> type | None:
    hint = typing.get_type_hints(schema)[name]
    options = [hint, *typing.get_args(hint)]
    return next((o for o in options if dataclasses.is_dataclass(o)), None)


def test_the_schema_gives_defaults_only_to_the_vote_parameters_and_the_synthetic_spec():
    assert set(_schema_defaults(TrainConfig)) == {
        "vote.k",
        "vote.center_slices",
        "vote.window_slices",
        "vote.slice_threshold",
        "vote.from_ckpt",
        "vote.mil",
        "vote.mil_features",
        *(f"data.synthetic.{f.name}" for f in dataclasses.fields(SyntheticSpec)),
    }


@pytest.mark.slow  # ~50 compositions
@pytest.mark.parametrize(("group", "choice"), _group_choices())
def test_every_choice_composes_completely_and_the_schema_holds_no_second_default(tmp_path, group, choice):
    cfg = compose_train(tmp_path, [f"{group}={choice}", f"data.root={tmp_path}" if group == "data" else "seed=1"])
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every key has a value, every ${...} resolves
    defaults = _schema_defaults(TrainConfig)
    # an experiment may set a key on purpose (experiment=patient_shift: its dataset); nothing else overrides the schema
    chosen = _dotted_keys(OmegaConf.load(REPO / "conf" / group / f"{choice}.yaml")) if group == "experiment" else set()
    for key, default in defaults.items():  # a value in the schema is never contradicted by a YAML file
        if key in chosen:
            continue
        value = OmegaConf.select(cfg, key)
        if value is not None or not key.startswith("data.synthetic."):  # data=covid_ct_md: no synthetic data
            actual = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
            assert actual == default, key
