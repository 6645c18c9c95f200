"""The benchmark: metrics on synthetic curves with known answers, recipes, and a quick run."""

from __future__ import annotations

import json

import pytest
import torch

import sbdata
from sbdata import SelectiveBatchLoader
from sbdata.bench import report

# ---------------------------------------------------------------- metrics


def test_targets_come_from_plain_final_accuracy():
    t = report.targets_from(99.0)  # error 1 %
    assert t["lossless"] == pytest.approx(98.9)
    assert t["err x1.1"] == pytest.approx(98.9)
    assert t["err x1.2"] == pytest.approx(98.8)
    assert t["err x1.4"] == pytest.approx(98.6)


def test_time_to_target_is_the_first_time_the_target_is_reached():
    seconds = [1.0, 2.0, 3.0, 4.0]
    accuracy = [90.0, 95.0, 94.0, 96.0]
    assert report.time_to_target(seconds, accuracy, 95.0) == 2.0  # reaching it exactly counts
    assert report.time_to_target(seconds, accuracy, 95.5) == 4.0
    assert report.time_to_target(seconds, accuracy, 89.0) == 1.0
    assert report.time_to_target(seconds, accuracy, 97.0) is None


def test_mean_curve_averages_per_epoch_and_rejects_ragged_seeds():
    secs, acc = report.mean_curve([[1.0, 2.0], [3.0, 4.0]], [[90.0, 92.0], [94.0, 96.0]])
    assert secs == [2.0, 3.0] and acc == [92.0, 94.0]
    with pytest.raises(ValueError, match="same number of epochs"):
        report.mean_curve([[1.0], [1.0, 2.0]], [[90.0], [90.0, 91.0]])


def test_summarize_gives_ratios_to_plain_on_mean_curves():
    # plain ends at 99.0 % (error 1 %): lossless 98.9, x1.1 98.9, x1.2 98.8, x1.4 98.6.
    plain = {"seconds": [[10, 20, 30, 40]] * 2, "accuracy": [[97.0, 98.6, 98.8, 99.1], [97.0, 98.6, 98.8, 98.9]]}
    # twice as fast per epoch, reaches 98.6 in epoch 1 and 98.9 in epoch 3; never 99.0.
    fast = {"seconds": [[5, 10, 15, 20], [5, 10, 15, 20]], "accuracy": [[98.6, 98.7, 98.9, 98.9]] * 2}
    slow = {"seconds": [[20, 40]] * 2, "accuracy": [[90.0, 95.0]] * 2}
    out = report.summarize({"plain": plain, "fast": fast, "slow": slow})
    p, f, s = (out["methods"][k] for k in ("plain", "fast", "slow"))
    assert out["targets"]["lossless"] == pytest.approx(98.9)
    assert p["final_mean"] == pytest.approx(99.0) and p["final_std"] == pytest.approx(0.1414, abs=1e-3)
    assert p["time_to"]["err x1.4"] == 20 and p["time_to"]["lossless"] == 40
    assert p["ratio"]["lossless"] == pytest.approx(1.0)
    assert f["time_to"]["err x1.4"] == 5 and f["ratio"]["err x1.4"] == pytest.approx(0.25)
    assert f["time_to"]["lossless"] == 15 and f["ratio"]["lossless"] == pytest.approx(15 / 40)
    assert f["ratio"]["err x1.2"] == pytest.approx(15 / 30)  # 98.8: plain at 30 s, fast at 15 s
    assert f["time_ratio"] == pytest.approx(0.5)
    assert s["ratio"]["err x1.4"] is None and s["ratio"]["lossless"] is None  # not reached
    table = report.markdown_table(out, {"plain": 4, "fast": 4, "slow": 2})
    assert "not reached" in table and "| fast | 4 |" in table
    with pytest.raises(ValueError, match="baseline"):
        report.summarize({"fast": fast})


# ---------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", sorted(sbdata.recipes.RECIPES))
def test_recipe_returns_loader_kwargs_with_its_own_epoch_budget(name):
    kwargs = sbdata.recipe(name, 8)
    assert isinstance(kwargs["epochs"], int) and kwargs["epochs"] >= 1
    assert sbdata.recipes.NEEDS_RECORD[name] in (True, False)
    assert sbdata.recipes.NEEDS_WEIGHTS[name] in (True, False)
    kwargs["keep"], original = 0.99, kwargs["keep"]  # a fresh dict: editing it changes no recipe
    assert sbdata.recipe(name, 8)["keep"] == original != 0.99
    kwargs["keep"] = original
    data = torch.utils.data.TensorDataset(torch.randn(32, 3), torch.randint(0, 2, (32,)))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    sb = SelectiveBatchLoader(loader, torch.nn.Linear(3, 2), **kwargs)
    assert sb.epochs == kwargs["epochs"]


@pytest.mark.parametrize("name", sorted(sbdata.recipes.RECIPES))
def test_needs_weights_says_whether_the_recipe_sets_batch_weights(name):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 3), torch.randint(0, 2, (256,)))
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)
    model = torch.nn.Linear(3, 2)
    sb = SelectiveBatchLoader(loader, model, **sbdata.recipe(name, 8))
    weights = []
    for _ in range(2):  # the plain warm-up epoch, then the first selective one
        for x, y in sb:
            sb.record(torch.nn.functional.cross_entropy(model(x), y, reduction="none").detach())
            weights.append(sb.batch_weights)
            assert sb.batch_weights is None or sb.batch_weights.shape == (len(y),)
    assert [s.mode for s in sb.stats.history] == ["plain", "stale"]
    selective = weights[8:]  # after the warm-up epoch's 8 batches
    assert all(w is None for w in weights[:8])
    if sbdata.recipes.NEEDS_WEIGHTS[name]:
        assert selective and all(w is not None for w in selective)
        assert any(bool((w > 1).any()) for w in selective)  # kept low-loss examples count more
    else:
        assert all(w is None for w in selective)


def test_reweighting_recipes_get_a_random_twin_matched_to_what_they_kept():
    from sbdata.bench.__main__ import matched_keep, methods

    plans = methods(8, 1.0)
    for name in sbdata.recipes.RECIPES:
        variable = plans[f"recipe:{name}"]["kwargs"]["policy"] in ("infobatch", "threshold")
        assert plans[f"random@{name}"].get("match") == (f"recipe:{name}" if variable else None)
    assert matched_keep(0.35, keep=0.2) == 0.35
    assert matched_keep(None, keep=0.2) == 0.2


def test_recipe_rejects_unknown_names_and_bad_budgets():
    with pytest.raises(ValueError, match="name must be one of"):
        sbdata.recipe("fastest", 8)
    with pytest.raises(ValueError, match="plain_epochs"):
        sbdata.recipe("fast", 0)


# ---------------------------------------------------------------- the quick run


def test_quick_benchmark_writes_json_markdown_and_plot_for_every_method(tmp_path, capsys):
    pytest.importorskip("mnist1d")
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    from sbdata.bench.__main__ import main

    out = tmp_path / "bench"
    main(["--quick", "--out", str(out), "--data-dir", str(tmp_path / "data")])
    assert "recipe:lossless seed 1" in capsys.readouterr().err  # the progress bar names each run
    results = json.loads((out / "results.json").read_text())
    markdown = (out / "results.md").read_text()
    png = (out / "time_to_accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for dataset in ("mnist1d", "digits"):
        study = results["studies"][dataset]
        assert "plain" in study["methods"] and len(study["methods"]) >= 8
        recipe, twin = study["methods"]["recipe:lossless"], study["methods"]["random@lossless"]
        kept = [s[-1] / c[-1] for s, c in zip(recipe["selected"], recipe["candidates"])]
        assert twin["matched_keep"] == pytest.approx(kept)  # the twin ran at the recipe's kept fraction
        assert all(0 < k < 1 for k in kept)
        for name, method in study["methods"].items():
            assert len(method["accuracy"]) == 2  # two seeds in quick mode
            assert name in study["summary"]["methods"]
            assert f"| {name} |" in markdown


def test_quick_sweep_runs_every_variant_against_plain_training(tmp_path):
    pytest.importorskip("mnist1d")
    from sbdata.bench.sweep import VARIANTS, main

    out = tmp_path / "sweep"
    sweep = main(["--quick", "--out", str(out), "--data-dir", str(tmp_path / "data"), "--workers", "1"])
    assert set(sweep["summary"]["methods"]) == {"plain", *VARIANTS}
    fast = {"interrupt": 0, **{k: v for k, v in sbdata.recipe("fast", 2).items() if k != "epochs"}}
    assert sweep["kwargs"]["keep0.12-x1.5 (fast)"] == fast  # the variant is the recipe itself
    lossless = {"interrupt": 0, **{k: v for k, v in sbdata.recipe("lossless", 2).items() if k != "epochs"}}
    assert sweep["kwargs"]["infobatch0.3-x1.5 (lossless)"] == lossless
    assert sweep["epochs"]["infobatch0.3-x1.5 (lossless)"] == sbdata.recipe("lossless", 2)["epochs"] == 3
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["summary"]["methods"]["plain"]["ratio"]["lossless"] == 1.0
    assert "| keep0.1-x3 | 6 |" in (out / "sweep.md").read_text()


def test_the_console_script_is_the_study_cli():
    from importlib.metadata import entry_points

    from sbdata.bench.__main__ import main

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "sbdata-bench"]
    assert script.load() is main


def test_quick_micro_benchmarks_measure_all_three_and_a_stale_epoch_loads_only_what_it_keeps(tmp_path):
    pytest.importorskip("mnist1d")
    pytest.importorskip("PIL")
    from sbdata.bench.micro import main

    results = main(["--quick", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "micro.json").read_text()) == json.loads(json.dumps(results))
    for view in ("iterate_only", "with_training_step"):
        timing = results["wrapper_overhead"][view]
        assert timing["ratio"] == pytest.approx(timing["sbdata_s"] / timing["by_hand_s"]) and timing["ratio"] > 0
    stale = results["stale_loading"]
    assert stale["stale_loaded"] == int(stale["keep"] * stale["examples"])  # skipped ones never read
    assert stale["stale_loaded"] + stale["stale_skipped"] == stale["examples"]
    scoring = results["scoring_scale_factor"]
    assert scoring["ratio"] == pytest.approx(scoring["half_s"] / scoring["full_s"])
