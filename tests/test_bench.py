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


# ---------------------------------------------------------------- modes, expected duration, --help


def _selection(argv):
    from sbdata.bench.__main__ import build_parser, selection

    return selection(build_parser().parse_args(argv))


def test_the_default_mode_is_the_first_look_one_seed_five_methods_on_mnist1d():
    from sbdata.bench.__main__ import FIRST_LOOK, planned_runs

    chosen = _selection([])
    assert chosen["mode"] == "default" and not chosen["quick"]
    assert chosen["datasets"] == ["mnist1d"] and chosen["seeds"] == [0]
    assert list(chosen["methods"]) == ["plain", "recipe:lossless", "random@lossless", "recipe:fast", "random@fast"]
    assert chosen["methods"] == FIRST_LOOK
    runs = planned_runs(chosen["datasets"], chosen["seeds"], chosen["quick"], chosen["methods"])
    names = [name for _, name, _, _, _ in runs]
    assert sorted(names) == sorted(FIRST_LOOK)
    assert names.index("random@lossless") == names.index("recipe:lossless") + 1  # the twin right after
    assert names.index("random@fast") == names.index("recipe:fast") + 1
    assert {hyp["num_samples"] for *_, hyp, _ in runs} == {60000}  # the full study's size, not the smoke one
    twin = dict((name, plan) for _, name, plan, _, _ in runs)["random@lossless"]
    assert twin["match"] == "recipe:lossless"  # still cost-matched to what the recipe keeps


def test_full_mode_runs_every_method_on_three_seeds_and_both_datasets_and_flags_override():
    from sbdata.bench.__main__ import HYP, methods, planned_runs

    chosen = _selection(["--full"])
    assert chosen["mode"] == "full" and chosen["methods"] is None and not chosen["quick"]
    assert chosen["seeds"] == [0, 1, 2] and chosen["datasets"] == ["mnist1d", "digits"]
    runs = planned_runs(chosen["datasets"], chosen["seeds"], chosen["quick"], chosen["methods"])
    per_seed = sum(len(methods(HYP[d]["epochs"], HYP[d]["scale_factor"])) for d in HYP)
    assert len(runs) == 3 * per_seed
    assert {(d, n) for d, n, *_ in runs} == {(d, n) for d in HYP for n in methods(HYP[d]["epochs"], HYP[d]["scale_factor"])}
    assert _selection(["--quick"])["quick"] and _selection(["--quick"])["seeds"] == [0, 1]
    custom = _selection(["--full", "--seeds", "4", "5", "--datasets", "digits"])
    assert custom["seeds"] == [4, 5] and custom["datasets"] == ["digits"] and custom["methods"] is None
    assert _selection(["--seeds", "3"])["seeds"] == [3]
    with pytest.raises(SystemExit):
        _selection(["--full", "--quick"])


def test_a_method_list_needs_plain_and_each_twins_recipe():
    from sbdata.bench.__main__ import hyps_for, plans_for

    hyps = hyps_for(["mnist1d"], quick=True)
    assert list(plans_for(hyps, ["plain", "recipe:fast"])["mnist1d"]) == ["plain", "recipe:fast"]
    with pytest.raises(ValueError, match="plain"):
        plans_for(hyps, ["recipe:fast"])
    with pytest.raises(ValueError, match="plain"):
        plans_for(hyps, ["plain", "no-such-method"])
    with pytest.raises(ValueError, match="recipe:lossless"):
        plans_for(hyps, ["plain", "random@lossless"])  # matched to what the recipe kept


def test_expected_duration_is_positive_and_grows_with_seeds_and_epochs(monkeypatch, tmp_path):
    from sbdata.bench import __main__ as bench

    def estimate(seeds, datasets=("mnist1d",), quick=False, only=bench.FIRST_LOOK):
        return bench.estimate_seconds(bench.planned_runs(datasets, seeds, quick, only), data_dir=str(tmp_path))

    one, two = estimate([0]), estimate([0, 1])
    assert 0 < one < two
    assert 30 < one < 300  # the first look: a few minutes at most
    full = estimate([0, 1, 2], datasets=("mnist1d", "digits"), only=None)
    assert 9.2 * 60 / 2 < full < 9.2 * 60 * 2  # docs/bench/results.md: the full study took 9.2 min
    assert 0 < estimate([0, 1], datasets=("mnist1d", "digits"), quick=True, only=None) < one
    generate = bench.CALIBRATION["mnist1d"]["generate_s"]  # tmp_path holds no cached MNIST-1D yet
    runs = one - bench.STARTUP_S - generate
    assert runs > 0 and bench.estimate_seconds([], data_dir=str(tmp_path)) == bench.STARTUP_S
    monkeypatch.setitem(bench.HYP, "mnist1d", {**bench.HYP["mnist1d"], "epochs": 16})  # twice plain's epochs
    assert estimate([0]) > one + 0.8 * runs
    (tmp_path / "mnist1d-n60000-seed42.npz").write_bytes(b"")  # once cached, it is not generated again
    monkeypatch.setitem(bench.HYP, "mnist1d", {**bench.HYP["mnist1d"], "epochs": 8})
    assert estimate([0]) == pytest.approx(one - generate)


def test_relative_epoch_cost_follows_the_kept_share_and_the_scoring_passes():
    from sbdata.bench.__main__ import methods, relative_epoch_cost

    plans = methods(8, 1.0)
    cost = {name: relative_epoch_cost(plan) for name, plan in plans.items()}
    assert cost["plain"] == cost["plain-half"] == 1.0
    assert 0 < cost["recipe:fast"] < cost["recipe:lossless"] < cost["recipe:balanced"] < 1.0
    assert cost["sb-rank"] > cost["random"]  # a scoring pass every epoch against one
    assert relative_epoch_cost(plans["random@lossless"], kept=0.1) < cost["random@lossless"]
    assert relative_epoch_cost(plans["recipe:fast"], eval_share=0.5) > cost["recipe:fast"]  # evaluation costs alike


def test_help_explains_each_mode_with_its_expected_duration(capsys):
    from sbdata.bench.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "first look (no flag)" in text and "--full: the multi-seed study" in text and "--quick: a smoke test" in text
    assert text.count(" min.") >= 2 and "idle 2-core CPU" in text
    assert "--seeds and --datasets override" in text


def test_headline_table_shows_the_two_recipe_targets_on_both_clocks():
    plain = {"seconds": [[10, 20, 30, 40]], "accuracy": [[97.0, 98.6, 98.8, 99.0]]}
    fast = {"seconds": [[5, 10, 15, 20]], "accuracy": [[98.6, 98.7, 98.9, 98.9]]}
    cpu = report.summarize({"plain": plain, "fast": fast})
    wall = report.summarize({"plain": plain, "fast": {**fast, "seconds": [[6, 12, 18, 24]]}})
    table = report.headline_table(cpu, wall, {"plain": 4, "fast": 4})
    assert "to lossless (98.90 %)" in table and "to err x1.4 (98.60 %)" in table
    assert "| fast | 4 | 98.90 | 20.0 (0.50x) | 0.38x (wall 0.45x) | 0.25x (wall 0.30x) |" in table
    assert "| plain | 4 | 99.00 | 40.0 (1.00x) | 1.00x (wall 1.00x) |" in table


def test_the_default_mode_at_smoke_size_prints_its_estimate_table_and_wall_clock(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mnist1d")
    pytest.importorskip("matplotlib")
    from sbdata.bench import __main__ as bench

    monkeypatch.setitem(bench.MODES, "default", {**bench.MODES["default"], "quick": True})  # the first look, tiny
    out = tmp_path / "bench"
    studies = bench.main(["--out", str(out), "--data-dir", str(tmp_path / "data"), "--no-progress"])
    assert list(studies) == ["mnist1d"] and list(studies["mnist1d"]["methods"]) == list(bench.FIRST_LOOK)
    study = studies["mnist1d"]
    assert all(len(m["accuracy"]) == 1 for m in study["methods"].values())  # one seed
    recipe = study["methods"]["recipe:lossless"]
    assert study["methods"]["random@lossless"]["matched_keep"] == pytest.approx([recipe["selected"][0][-1] / recipe["candidates"][0][-1]])
    printed = capsys.readouterr().out
    assert printed.startswith("sbdata.bench, default mode: 5 runs") and "expected ~" in printed
    assert "| random@fast |" in printed and "to err x1.4" in printed and "total wall-clock" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["mode"] == "default" and results["meta"]["expected_minutes"] > 0
    assert "| recipe:fast |" in (out / "results.md").read_text()
    assert (out / "time_to_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_sweep_runs_every_variant_against_plain_training(tmp_path):
    pytest.importorskip("mnist1d")
    from sbdata.bench.sweep import VARIANTS, main

    out = tmp_path / "sweep"
    sweep = main(["--quick", "--out", str(out), "--data-dir", str(tmp_path / "data"), "--workers", "1"])
    assert set(sweep["summary"]["methods"]) == {"plain", *VARIANTS}
    fast = {"interrupt": 0, **{k: v for k, v in sbdata.recipe("fast", 2).items() if k != "epochs"}}
    assert sweep["kwargs"]["keep0.12-x1.5 (fast)"] == fast  # the variant is the recipe itself
    lossless = {"interrupt": 0, **{k: v for k, v in sbdata.recipe("lossless", 2).items() if k != "epochs"}}
    assert sweep["kwargs"]["infobatch0.5-end.875-x1.5 (lossless)"] == lossless
    assert sweep["epochs"]["infobatch0.5-end.875-x1.5 (lossless)"] == sbdata.recipe("lossless", 2)["epochs"] == 3
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
