"""Time-to-accuracy study of Selective Backprop recipes on built-in data (no download).

    python -m sbdata.bench                     # full study: 3 seeds, ~8 min on a 2-core CPU
    python -m sbdata.bench --quick             # smoke test, well under a minute
    python -m sbdata.bench --out runs/bench --seeds 0 1 2 --datasets mnist1d digits

Every method trains the same model with the same loop (``sbdata/bench/train.py``) and the
same LR schedule shape over its own epoch budget; plain training iterates the DataLoader
itself. Runs are interleaved (seed by seed, methods in a rotating order) so that the noise of
a shared machine hits every method alike. The output folder gets ``results.json``,
``results.md`` and ``time_to_accuracy.png``; see ``sbdata/bench/report.py`` for the metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from sbdata.recipes import NEEDS_RECORD, RECIPES, recipe

from . import report
from .train import train


#: Per-dataset settings. ``epochs`` is plain training's fixed budget.
HYP: dict[str, dict[str, Any]] = {
    "mnist1d": dict(
        model="cnn1d", width=32, batch_size=128, lr=3e-3, weight_decay=5e-4, epochs=8, num_samples=60000, scale_factor=1.0
    ),
    "digits": dict(model="cnn2d", width=16, batch_size=32, lr=3e-3, weight_decay=5e-4, epochs=12, scale_factor=0.5),
}
QUICK: dict[str, dict[str, Any]] = {
    "mnist1d": dict(width=8, epochs=2, num_samples=1000),
    "digits": dict(width=4, epochs=2, train_limit=320),
}


def methods(plain_epochs: int, scale_factor: float) -> dict[str, dict[str, Any]]:
    """The study's methods: ``{name: {"kwargs": SelectiveBatchLoader kwargs or None,
    "epochs": budget, "record": whether the loop calls sb.record()}}``.

    ``scale_factor < 1`` adds ``sb-rank`` scored on downsampled inputs (digits: 8x8 -> 4x4).
    """
    E, sf = plain_epochs, scale_factor

    def m(kwargs: dict[str, Any] | None, epochs: int = E, record: bool = False) -> dict[str, Any]:
        return {"kwargs": kwargs, "epochs": epochs, "record": record}

    out = {
        "plain": m(None),
        # The other control: plain training with half the budget (a shorter LR schedule).
        "plain-half": m(None, max(1, E // 2)),
        # The control: loss-blind. policy="random" keeps the scoring pass that the same settings
        # run with a loss-based policy (here one, at the first epoch), so it costs what SB costs.
        "random": m(dict(keep=0.5, policy="random", stale="once")),
        "sb-rank": m(dict(keep=0.5, policy="rank")),
        "sb-threshold": m(dict(keep=0.5, policy="threshold")),
        "composer": m(dict(keep=0.5, policy="rank", start=0.5, end=0.9, interrupt=2)),
        "stale-sb-3": m(dict(keep=0.5, policy="rank", stale=3), record=True),
        "infobatch": m(dict(keep=0.5, policy="infobatch", stale="once", end=0.875), record=True),
    }
    if sf < 1.0:
        out[f"sb-rank-sf{sf:g}"] = m(dict(keep=0.5, policy="rank", scale_factor=sf))
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


#: Policies whose kept fraction depends on the losses (see NOTE [ Cost-matched random twins ]).
VARIABLE_KEEP = ("infobatch", "threshold")


def matched_keep(kept_fraction: float | None, keep: float) -> float:
    """The ``keep`` of a random twin matched to a recipe that kept ``kept_fraction`` of its
    candidates (``keep`` itself if the recipe never selected)."""
    return keep if kept_fraction is None else min(1.0, max(kept_fraction, 1e-6))


def load(dataset: str, hyp: dict[str, Any], data_dir: str | None) -> tuple:
    from sbdata.datasets import load_digits, load_mnist1d

    if dataset == "mnist1d":
        return load_mnist1d(num_samples=hyp["num_samples"], cache_dir=data_dir)
    if dataset == "digits":
        x, y, x_test, y_test = load_digits()
        limit = hyp.get("train_limit", len(y))
        return x[:limit], y[:limit], x_test, y_test
    raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(HYP)}")


def _progress(total: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is optional
        return None
    return tqdm(total=total, unit="epoch", dynamic_ncols=True)


_DATA: dict[tuple, tuple] = {}  # each dataset is loaded once


def dataset_once(dataset: str, hyp: dict[str, Any], data_dir: str | None) -> tuple:
    """:func:`load`, memoised per process (worker processes forked later inherit it)."""
    key = (dataset, hyp.get("num_samples"), hyp.get("train_limit"), data_dir)
    if key not in _DATA:
        _DATA[key] = load(dataset, hyp, data_dir)
    return _DATA[key]


def run_one(task: tuple, progress: Any = None) -> tuple[str, str, dict[str, Any]]:
    """One training run: ``(dataset, method name, plan, hyp, seed, data_dir, threads)``."""
    dataset, name, plan, hyp, seed, data_dir, threads = task
    torch.set_num_threads(threads)
    data = dataset_once(dataset, hyp, data_dir)
    curve = train(data, hyp, plan["kwargs"], epochs=plan["epochs"], seed=seed, record=plan["record"], progress=progress)
    return dataset, name, curve.__dict__


def run_study(
    datasets: Sequence[str],
    seeds: Sequence[int],
    quick: bool,
    data_dir: str | None,
    *,
    threads: int = 1,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run every (seed, dataset, method) and summarise. Runs go seed by seed, methods in an
    order rotated per seed, one run at a time."""
    hyps = {d: {**HYP[d], **(QUICK[d] if quick else {})} for d in datasets}
    plans = {d: methods(hyps[d]["epochs"], hyps[d]["scale_factor"]) for d in datasets}
    tasks = []
    for s, seed in enumerate(seeds):
        for dataset in datasets:
            names = list(plans[dataset])
            names = names[s % len(names) :] + names[: s % len(names)]  # rotate: no fixed position
            for twin in [n for n in names if "match" in plans[dataset][n]]:  # after its recipe
                names.remove(twin)
                names.insert(names.index(plans[dataset][twin]["match"]) + 1, twin)
            tasks += [(dataset, name, plans[dataset][name], hyps[dataset], seed, data_dir, threads) for name in names]
    curves: dict[str, dict[str, list]] = {d: {name: [] for name in plans[d]} for d in datasets}
    bar = _progress(sum(t[2]["epochs"] for t in tasks)) if show_progress else None
    kept: dict[tuple, float | None] = {}  # (dataset, method, seed) -> kept fraction
    matched: dict[tuple, list[float]] = {}  # (dataset, twin) -> the keep it ran with, per seed
    for task in tasks:
        dataset, name, plan, hyp, seed = task[:5]
        if "match" in plan:  # NOTE [ Cost-matched random twins ]
            keep = matched_keep(kept[(dataset, plan["match"], seed)], plan["kwargs"]["keep"])
            plan = {**plan, "kwargs": {**plan["kwargs"], "keep": keep}}
            task = (dataset, name, plan, *task[3:])
            matched.setdefault((dataset, name), []).append(keep)
        if bar is not None:
            bar.set_description(f"{dataset} {name} seed {seed}")
        dataset, name, curve = run_one(task, bar)  # the bar advances after every epoch
        curves[dataset][name].append(curve)
        kept[(dataset, name, seed)] = _kept_fraction(curve)
    if bar is not None:
        bar.close()
    studies = {}
    for dataset in datasets:
        keys = ("seconds", "cpu_seconds", "accuracy", "backprops", "scored", "selected", "candidates")
        per_method = {name: {k: [c[k] for c in curves[dataset][name]] for k in keys} for name in plans[dataset]}
        studies[dataset] = {
            "hyp": hyps[dataset],
            "methods": {
                name: {**plans[dataset][name], **per_method[name], **_matched(matched, dataset, name)}
                for name in plans[dataset]
            },
            "summary": report.summarize(_on_clock(per_method, "cpu_seconds")),  # the headline clock
            "summary_wall": report.summarize(_on_clock(per_method, "seconds")),
        }
    return studies


def _matched(matched: dict[tuple, list[float]], dataset: str, name: str) -> dict[str, Any]:
    return {"matched_keep": matched[(dataset, name)]} if (dataset, name) in matched else {}


def _kept_fraction(curve: dict[str, Any]) -> float | None:
    return curve["selected"][-1] / curve["candidates"][-1] if curve["candidates"] and curve["candidates"][-1] else None


def _on_clock(per_method: dict[str, dict[str, Any]], clock: str) -> dict[str, dict[str, Any]]:
    """``{name: {"seconds", "accuracy"}}`` with ``seconds`` read from ``clock``."""
    return {n: {"seconds": m[clock], "accuracy": m["accuracy"]} for n, m in per_method.items()}


def write(studies: dict[str, Any], out: Path, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "studies": studies}, indent=1))
    lines = [
        "# sbdata time-to-accuracy study\n",
        f"`{meta['command']}` on {meta['machine']}, seeds {meta['seeds']}, {meta['minutes']:.1f} min.\n",
    ]
    lines.append(
        "Ratios are a method's time to the target over plain training's time to the same target "
        "(mean curve over seeds; see sbdata/bench/report.py). Clock: process CPU time of training "
        "(one torch thread, no loader workers: the wall-clock of a dedicated core; evaluation excluded).\n"
    )
    for dataset, study in studies.items():
        epochs = {n: m["epochs"] for n, m in study["methods"].items()}
        lines += [f"## {dataset}\n", f"Settings: `{json.dumps(study['hyp'])}`\n", "CPU-time clock:\n"]
        lines += [report.markdown_table(study["summary"], epochs), "", "Wall-clock (shared machine, noisier):\n"]
        lines += [report.markdown_table(study["summary_wall"], epochs), ""]
        lines.append("Methods (SelectiveBatchLoader keyword arguments; record = the loop calls sb.record()):\n")
        for name, m in study["methods"].items():
            line = f"- `{name}`: epochs={m['epochs']}, record={m['record']}, `{m['kwargs']}`"
            if "matched_keep" in m:
                keeps = ", ".join(f"{k:.3f}" for k in m["matched_keep"])
                line += f"; keep matched to what `{m['match']}` kept, per seed: {keeps}"
            lines.append(line)
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))
    panels = {d: {"methods": _on_clock(s["methods"], "cpu_seconds"), "summary": s["summary"]} for d, s in studies.items()}
    report.plot(panels, str(out / "time_to_accuracy.png"))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m sbdata.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0 1)")
    parser.add_argument("--datasets", nargs="+", default=list(HYP), choices=list(HYP))
    parser.add_argument("--quick", action="store_true", help="tiny data and models: a smoke test")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1, for stable timings)")
    parser.add_argument("--data-dir", default=None, help="MNIST-1D cache folder (default ~/.cache/sbdata)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2])
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    studies = run_study(
        args.datasets, seeds, args.quick, args.data_dir, threads=args.threads, show_progress=not args.no_progress
    )
    meta = {
        "command": "python -m sbdata.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores), {args.threads} torch thread(s) per run, "
        f"one run at a time, torch {torch.__version__}",
        "seeds": seeds,
        "minutes": (time.perf_counter() - began) / 60,
    }
    write(studies, Path(args.out), meta)
    for dataset, study in studies.items():
        epochs = {n: m["epochs"] for n, m in study["methods"].items()}
        print(f"\n{dataset} (CPU-time clock)\n" + report.markdown_table(study["summary"], epochs))
    print(f"\nwrote {args.out}/results.json, results.md, time_to_accuracy.png ({meta['minutes']:.1f} min)")
    return studies


if __name__ == "__main__":
    main()
