import subprocess
import sys
import zipfile

import pytest
from omegaconf import OmegaConf

from goldstone_cli.config import GROUPS, ConfigError, compose, conf_dir, group_options, load_run_config, to_yaml


def test_conf_dir_has_every_group():
    root = conf_dir()
    assert (root / "config.yaml").is_file()
    for g in ("model", "data", "optimizer"):
        assert group_options(g), f"conf/{g} has no options"


@pytest.mark.parametrize("group", [g for g in GROUPS if g != "sweep"])
def test_every_group_option_composes(group):
    for option in group_options(group):
        try:
            cfg = compose([f"{group}={option}"])
        except ConfigError as exc:
            # an option may require a matching choice in another group (e.g. a model and its data)
            assert "needs" in str(exc) or "data" in str(exc), exc
            continue
        if group == "experiment":  # an experiment is a whole set-up, named after itself
            assert cfg.name == option and cfg.choices.experiment == option
        else:
            assert cfg[group] is not None and cfg.choices[group] == option
        OmegaConf.to_object(cfg)  # every dataclass instantiates


def test_default_is_paper_section_5_1():
    cfg = compose([])
    assert cfg.model.name == "dense_mf" and cfg.model.d == 3 and cfg.model.coupling == 10.0
    assert cfg.data.T == 30 and cfg.data.n_rows == 10 and cfg.data.rank == 3 and cfg.data.noise_var == 1e-3


def test_overrides_apply():
    cfg = compose(["optimizer=adam", "optimizer.lr=0.05", "trainer.steps=7", "data.T=12", "seed=3"])
    assert cfg.optimizer.name == "adam" and cfg.optimizer.lr == 0.05
    assert cfg.trainer.steps == 7 and cfg.data.T == 12 and cfg.seed == 3


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optimizer=sgdd", "valid choices: adagrad, "),
        ("model=nope", "unknown model 'nope'"),
        ("trainer.steps=-5", "trainer.steps must be >= 0"),
        ("trainer.steps=many", "trainer.steps"),
        ("trainer.device=tpu", "expected one of [auto, cpu, cuda]"),
        ("trainer.dtype=float16", "float32, float64"),
        ("model.dd=3", "model.dd"),
        ("+model.dd=3", "unknown key model.dd"),
        ("optimizer.lr=-1", "optimizer.lr must be > 0"),
        ("optimizer.betas=[0.9]", "optimizer.betas"),
        ("nonsense=1", "nonsense"),
    ],
)
def test_bad_override_is_one_clear_line(override, expected):
    with pytest.raises(ConfigError) as info:
        compose([override])
    msg = str(info.value)
    assert expected in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("optimizer.lr=nan", "optimizer.lr"),
        ("optimizer.lr=inf", "optimizer.lr"),
        ("optimizer.clip=inf", "optimizer.clip"),
        ("optimizer.clip=nan", "optimizer.clip"),
        ("optimizer.decay_power=nan", "optimizer.decay_power"),
        ("optimizer.decay_steps=inf", "optimizer.decay_steps"),
        ("model.init_scale=inf", "model.init_scale"),
        ("model.coupling=nan", "model.coupling"),
        ("trainer.target=nan", "trainer.target"),
        ("trainer.target=-inf", "trainer.target"),
        ("data.noise_var=nan", "data.noise_var"),
    ],
)
def test_nan_and_inf_are_rejected_with_one_line(override, key):
    with pytest.raises(ConfigError) as info:
        compose([override])
    msg = str(info.value)
    assert msg.startswith(f"{key} must be a finite number") and "\n" not in msg


def test_nan_rejected_for_goldstone_and_movielens_options():
    for overrides in (["optimizer=goldstone", "optimizer.lr_scale=nan"], ["optimizer=goldstone", "optimizer.tol=inf"],
                      ["model=movielens", "data=movielens", "model.gamma=nan"],
                      ["model=movielens", "data=movielens", "data.split=[nan,0.5,0.5]"]):
        with pytest.raises(ConfigError, match="must be a finite number"):
            compose(overrides)


def test_nan_override_on_resume_is_rejected(tmp_path):
    cfg = compose(["trainer.steps=3"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    with pytest.raises(ConfigError, match="optimizer.lr must be a finite number"):
        load_run_config(tmp_path, ["optimizer.lr=.nan"])


def test_load_run_config_roundtrip(tmp_path):
    from goldstone_cli.config import to_yaml

    cfg = compose(["optimizer=adam", "trainer.steps=11"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    again = load_run_config(tmp_path, ["trainer.steps=22"])
    assert again.trainer.steps == 22 and again.optimizer.name == "adam"
    with pytest.raises(ConfigError, match="cannot switch optimizer"):
        load_run_config(tmp_path, ["optimizer=gd"])
    with pytest.raises(ConfigError, match="trainer.nope"):
        load_run_config(tmp_path, ["trainer.nope=1"])


def test_wheel_ships_the_configs(tmp_path):
    """An installed package (not only a source checkout) must find conf/ (lightning-hydra-template #525)."""
    repo = conf_dir().parent if (conf_dir().parent / "pyproject.toml").exists() else None
    if repo is None:
        pytest.skip("not running from a source checkout")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(repo)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("goldstone-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "goldstone_cli/conf/config.yaml" in names
    for g in ("model", "data", "optimizer"):
        for option in group_options(g):
            assert f"goldstone_cli/conf/{g}/{option}.yaml" in names
