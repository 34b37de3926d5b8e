"""Every model composes with every optimizer: `model=X optimizer=Y` is Y with X's tuned settings,
explicit overrides and experiments win, and each combination trains to a finite loss."""

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from goldstone_cli.cli import app
from goldstone_cli.config import (REMOVED_OPTIMIZERS, ConfigError, compose, group_options, tuned_settings,
                                  tuned_tables)
from goldstone_cli.train import new_run_dir, train

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")

BASES = ("gd", "adagrad", "adam")
SOLVERS = ("procrustes", "natural")
# every optimizer option: the three bases alone, and Goldstone-GD on each base with each solver
OPTIONS = [(b, None, None) for b in BASES] + [("goldstone", b, s) for b in BASES for s in SOLVERS]
# the fast suite's combinations (the rest are marked slow): every base and both solvers on dense_mf,
# every model with the paper's optimizer for it
FAST = {("dense_mf", ("gd", None, None)), ("dense_mf", ("adagrad", None, None)), ("dense_mf", ("adam", None, None)),
        ("dense_mf", ("goldstone", "gd", "natural")), ("dense_mf", ("goldstone", "adam", "procrustes")),
        ("movielens", ("goldstone", "adagrad", "natural")), ("dwe", ("goldstone", "adam", "procrustes")),
        ("dwe_map", ("adam", None, None))}


def _option_overrides(opt) -> list[str]:
    name, base, solver = opt
    if name != "goldstone":
        return [f"optimizer={name}"]
    # k1=2: gauge steps within the few training steps; k2=2 keeps the natural solver quick
    return ["optimizer=goldstone", f"optimizer.base={base}", f"optimizer.solver={solver}", "optimizer.k1=2",
            "optimizer.k2=2"]


# ----------------------------------------------------------------------------- composition
def test_model_and_optimizer_compose_with_the_models_tuned_settings():
    cfg = compose(["model=movielens", "optimizer=goldstone"])
    o = cfg.optimizer
    assert (o.base.value, o.lr, o.solver.value, o.k1, o.k2) == ("adagrad", 1.0, "natural", 100, 10)  # paper Sec. 5.2
    assert cfg.name == "goldstone-adagrad-natural" and cfg.choices.model == "movielens"
    assert "tuned" not in cfg  # the table is applied, not carried into the run's config
    o = compose(["model=dwe", "optimizer=goldstone"]).optimizer  # paper Sec. 5.3: Adam, decaying rate, k1=10
    assert (o.base.value, o.lr, o.schedule.value, o.decay_steps, o.k1) == ("adam", 0.1, "decay", 1000, 10)
    o = compose(["model=dwe", "optimizer=adam"]).optimizer
    assert (o.name, o.lr, o.schedule.value, o.decay_power) == ("adam", 0.1, "decay", 0.7)
    o = compose(["model=dwe_map", "optimizer=goldstone"]).optimizer  # dwe_map inherits dwe's table
    assert (o.base.value, o.lr, o.k1) == ("adam", 0.1, 10)
    o = compose(["optimizer=gd"]).optimizer  # dense_mf: the best constant rate of docs/benchmarks.md
    assert (o.lr, o.schedule.value, o.clip) == (0.02, "constant", None)
    o = compose([]).optimizer
    assert (o.name, o.base.value, o.lr, o.solver.value, o.k1) == ("goldstone", "gd", 0.02, "procrustes", 50)


def test_explicit_overrides_and_experiments_win_over_tuned_settings():
    # another base takes that base's tuned settings; an explicit value beats every tuned one
    o = compose(["model=movielens", "optimizer=goldstone", "optimizer.base=adam"]).optimizer
    movielens = tuned_tables()["movielens"]
    assert o.base.value == "adam" and o.lr == movielens["adam"]["lr"] and o.k1 == 100
    o = compose(["model=movielens", "optimizer=goldstone", "optimizer.lr=0.3", "optimizer.solver=procrustes"]).optimizer
    assert (o.lr, o.solver.value, o.base.value) == (0.3, "procrustes", "adagrad")
    # an experiment's settings beat the model's tuned ones, and the command line beats the experiment
    o = compose(["experiment=fig2_gd_paper"]).optimizer
    assert (o.name, o.lr, o.clip, o.schedule.value, o.decay_steps) == ("gd", 1.0, 0.01, "decay", 100)
    assert compose(["experiment=fig2_gd_paper", "optimizer.clip=0.1"]).optimizer.clip == 0.1
    # tuned=none: the optimizer option's own values
    assert compose(["model=movielens", "optimizer=adagrad", "tuned=none"]).optimizer.lr == 0.1
    with pytest.raises(ConfigError, match="tuned=none"):
        compose(["tuned=maybe"])


def test_experiments_are_the_papers_setups():
    fig3 = compose(["experiment=fig3"])
    assert (fig3.model.name, fig3.model.d, fig3.data.T, str(fig3.data.path)) == ("movielens", 30, 100, "data/ml-20m")
    assert (fig3.optimizer.base.value, fig3.optimizer.lr, fig3.optimizer.k1, fig3.optimizer.k2) == ("adagrad", 1.0, 100, 10)
    base = compose(["experiment=fig3_adagrad"]).optimizer
    assert (base.name, base.lr) == ("adagrad", 1.0)
    dwe = compose(["experiment=dwe_paper"])
    assert (dwe.model.d, dwe.data.vocab_size, dwe.data.bin_years, dwe.trainer.steps) == (100, 10000, 1, 10000)
    assert (dwe.model.inference, dwe.optimizer.base.value, dwe.optimizer.k1, dwe.optimizer.lr) == ("variational", "adam", 10, 0.1)
    adam = compose(["experiment=dwe_paper_adam"])
    assert (adam.optimizer.name, adam.optimizer.decay_steps, adam.data.vocab_size) == ("adam", 1000, 10000)
    fig2 = compose(["experiment=fig2"]).optimizer
    assert (fig2.solver.value, fig2.k1, fig2.k2, fig2.lr) == ("natural", 50, 10, 0.02)


def test_every_model_has_a_tuned_section_for_every_optimizer():
    tables = tuned_tables()
    for model in group_options("model"):
        assert set(tables[model]) == {"gd", "adagrad", "adam", "goldstone"}, model
        for base in BASES:
            assert {"lr", "schedule", "clip"} <= set(tables[model][base]), (model, base)


@pytest.mark.parametrize("old", sorted(REMOVED_OPTIMIZERS))
def test_removed_preset_names_say_the_new_spelling(old):
    with pytest.raises(ConfigError) as info:
        compose([f"optimizer={old}"])
    msg = str(info.value)
    assert "\n" not in msg and f"optimizer={old} was removed" in msg and "experiment=" in msg
    new = msg.split("use ", 1)[1]
    for word in new.split():  # every experiment and optimizer it names exists
        if word.startswith("experiment="):
            assert word.split("=")[1] in group_options("experiment"), word
        if word.startswith("optimizer="):
            assert word.split("=")[1] in group_options("optimizer"), word


@pytest.mark.parametrize("override, hint", [
    ("trainer.stepz=5", "did you mean trainer.steps?"),
    ("optimizr=adam", "did you mean optimizer=adam?"),
    ("optimizer=adamm", "did you mean optimizer=adam?"),
    ("experiment=fig22", "did you mean experiment=fig2?"),
    ("model.copling=3", "did you mean model.coupling?"),
    ("+model.copling=3", "did you mean model.coupling?"),
    ("seeed=1", "did you mean seed?"),
    ("+seeed=1", "did you mean seed?"),  # forced in with + at the top level: refused all the same
    ("+foo=1", "unknown top-level key foo"),
])
def test_unknown_keys_and_options_suggest_the_closest(override, hint):
    with pytest.raises(ConfigError) as info:
        compose([override])
    assert hint in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, hint", [  # the review's first guesses: no hint at all before
    (["steps=10"], "did you mean trainer.steps=10?"),
    (["lr=0.1"], "did you mean optimizer.lr=0.1?"),
    (["optimizer.learning_rate=0.1"], "did you mean optimizer.lr=0.1?"),
    (["model.lr=0.1"], "did you mean optimizer.lr=0.1?"),
    (["model.embedding_dim=4"], "did you mean model.d=4?"),
    (["optimizer=adam", "optimizer.solver=natural"],
     "optimizer.solver is a setting of optimizer=goldstone, which takes this optimizer's steps as its base: "
     "optimizer=goldstone optimizer.base=adam optimizer.solver=natural"),
    (["optimizer=adam", "optimizer.base=gd"], "optimizer=goldstone optimizer.base=gd)"),
    (["epochs=3"], "valid: model=OPTION, data=OPTION, optimizer=OPTION, experiment=OPTION, name, "),
])
def test_a_key_of_another_group_or_optimizer_is_named(overrides, hint):
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    assert hint in str(info.value) and "\n" not in str(info.value)
    assert "betas" not in str(info.value)  # optimizer.base=gd suggested "did you mean optimizer.betas?"


@pytest.mark.parametrize("overrides, message", [
    (["optimizer=adagrad", "optimizer.momentum=0.9"],
     "optimizer.momentum=0.9 has no effect with optimizer=adagrad (it is a setting of gd); drop it, or choose optimizer=gd"),
    (["optimizer=adam", "optimizer.momentum=0.9"], "no effect with optimizer=adam"),
    (["optimizer=gd", "optimizer.betas=[0.8,0.9]"], "optimizer.betas=[0.8, 0.9] has no effect with optimizer=gd"),
    (["optimizer=gd", "optimizer.eps=1e-6"], "it is a setting of adam and adagrad"),
    (["optimizer=goldstone", "optimizer.base=adam", "optimizer.momentum=0.5"],
     "no effect with optimizer.base=adam (it is a setting of gd); drop it, or choose optimizer.base=gd"),
])
def test_a_setting_of_another_base_optimizer_is_refused(overrides, message):
    """optimizer=adagrad optimizer.momentum=0.9 trained without momentum and said nothing."""
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    assert message in str(info.value)
    for ok in (["optimizer=gd", "optimizer.momentum=0.9"], ["optimizer=adam", "optimizer.betas=[0.8,0.9]"],
               ["optimizer=adagrad", "optimizer.eps=1e-6"], ["optimizer=goldstone", "optimizer.base=gd",
                                                             "optimizer.momentum=0.5"]):
        compose(ok)


def test_tuned_table_errors_name_the_file():
    from omegaconf import OmegaConf

    bad = OmegaConf.create({"tuned": {"sgd": {"lr": 1}}, "optimizer": {"name": "gd"}, "model": {"name": "m"}})
    with pytest.raises(ConfigError, match="tuned.sgd is not an optimizer"):
        tuned_settings(bad)


# ----------------------------------------------------------------------------- names of runs
def test_runs_are_named_after_what_ran(in_tmp, monkeypatch):
    import goldstone_cli.report as report

    titles = []
    monkeypatch.setattr(report, "plot_losses", lambda csv, png, title="", **kw: titles.append(title))
    res = train(compose(["experiment=fig2_gd_paper", "trainer.steps=3", "trainer.progress=false"]))
    assert res.run_dir.parent == Path("outputs/dense_mf") and res.run_dir.name.endswith("_fig2_gd_paper")
    s = json.loads((res.run_dir / "summary.json").read_text())
    assert (s["name"], s["method"], s["optimizer"], s["choices"]["experiment"]) == ("fig2_gd_paper", "gd", "gd",
                                                                                   "fig2_gd_paper")
    assert titles == ["dense_mf / fig2_gd_paper (gd)"]
    res = train(compose(["optimizer=goldstone", "optimizer.solver=natural", "trainer.steps=3", "trainer.progress=false"]))
    assert res.run_dir.name.endswith("_goldstone-gd-natural") and titles[-1] == "dense_mf / goldstone-gd-natural"
    # dwe_map runs go to outputs/dwe_map (the model option), though their model.name is dwe
    cfg = compose(["model=dwe_map", "optimizer=adam"])
    assert cfg.model.name == "dwe" and new_run_dir(cfg).parent == Path("outputs/dwe_map")
    assert compose(["name=my-test"]).name == "my-test"


# ----------------------------------------------------------------------------- every combination trains
def _params():
    out = []
    for model in ("dense_mf", "movielens", "dwe", "dwe_map"):
        for opt in OPTIONS:
            marks = [] if (model, opt) in FAST else [pytest.mark.slow]
            out.append(pytest.param(model, opt, marks=marks, id=f"{model}-{'-'.join(x for x in opt if x)}"))
    return out


@pytest.mark.parametrize("model, opt", _params())
def test_every_model_trains_with_every_optimizer(in_tmp, request, model, opt):
    data = {"dense_mf": ["data.T=4", "data.n_rows=6", "data.n_cols=5", "model.d=2"],
            "movielens": request.getfixturevalue("tiny_movielens") if model == "movielens" else [],
            "dwe": request.getfixturevalue("tiny_corpus") if model.startswith("dwe") else []}
    sizes = data["dwe" if model.startswith("dwe") else model]
    cfg = compose([f"model={model}", *_option_overrides(opt), *sizes, "trainer.steps=4", "trainer.eval_every=4",
                   "trainer.log_every=1", "trainer.progress=false"])
    name, base, solver = opt
    table = tuned_tables()[model]
    assert cfg.optimizer.lr == table[base or name]["lr"]  # the model's tuned rate for this base
    result = train(cfg)
    s = result.summary
    assert result.status == "completed" and s["steps"] == 4
    assert math.isfinite(s["final"]["total"]), s["final"]
    assert result.run_dir.parent.name == model
    if name == "goldstone":
        assert s["gauge_steps"] == 2 and s["method"] == f"goldstone-{base}-{solver}"


def test_train_help_lists_every_model_with_every_optimizer():
    res = runner.invoke(app, ["train", "--help"], terminal_width=200)
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for group in ("model", "optimizer", "experiment"):
        assert f"{group}: " + ", ".join(group_options(group)) in text
    from goldstone_cli.config import describe_tuned

    for model, table in tuned_tables().items():
        assert f"{model}: {describe_tuned(table)}" in text, model
    assert "optimizer.base=gd|adagrad|adam" in text and "optimizer.solver=procrustes|natural" in text


@pytest.mark.parametrize("model", ["dense_mf", "movielens", "dwe"])
@pytest.mark.parametrize("base", ["gd", "adagrad", "adam"])
def test_goldstone_runs_its_base_with_the_settings_of_that_optimizer_option(model, base):
    """Goldstone-GD on a base takes that base's own settings (AdaGrad's eps 1e-10, not the shared
    schema's 1e-8) and the model's tuned ones, so a GD-vs-Goldstone-GD comparison differs only by the
    gauge steps; an explicit optimizer.eps still wins."""
    plain = compose([f"model={model}", f"optimizer={base}"]).optimizer
    gauged = compose([f"model={model}", "optimizer=goldstone", f"optimizer.base={base}"]).optimizer
    for key in ("lr", "eps", "schedule", "clip"):
        if key in plain:
            assert gauged[key] == plain[key], key
    if base == "gd":  # gd has no eps: refused rather than ignored
        with pytest.raises(ConfigError, match="optimizer.eps=0.001 has no effect with optimizer.base=gd"):
            compose(["optimizer=goldstone", f"optimizer.base={base}", "optimizer.eps=0.001"])
    else:
        assert compose(["optimizer=goldstone", f"optimizer.base={base}", "optimizer.eps=0.001"]).optimizer.eps == 0.001


def test_experiment_null_and_experiment_keys():
    """experiment=null means no experiment (also after another experiment=...); experiment.KEY=...
    says how an experiment's settings are overridden instead of suggesting 'experiment'."""
    assert compose(["experiment=null"]).choices["experiment"] is None
    assert compose(["experiment=fig2_gd_paper", "experiment=null"]).choices["experiment"] is None
    with pytest.raises(ConfigError, match=r"chosen with experiment=NAME.*trainer.steps=100") as info:
        compose(["experiment.foo=1"])
    assert "did you mean" not in str(info.value)
