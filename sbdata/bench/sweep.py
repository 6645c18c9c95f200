"""The earlier recipe search on MNIST-1D alone: variants of the recipes, side by side.

The recipes are now chosen on the whole suite with ``python -m sbdata.bench.suite_sweep``;
this MNIST-1D sweep (two runs at a time) is kept for its finer grid.

    python -m sbdata.bench.sweep --out runs/sweep          # ~8 min on a 2-core CPU
    python -m sbdata.bench.sweep --quick --out /tmp/sweep  # a few seconds

Every variant is the stale, ``record()``-driven setting the recipes use (``stale`` large, one
plain warm-up epoch, ``record()`` on every batch, InfoBatch's ``batch_weights`` applied) with
one thing changed: the kept fraction, ``interrupt`` (every n-th source batch passes through
whole), the epoch budget (a multiple of plain training's 8 epochs), the policy, or periodic
rescoring. Plain training runs in the
same sweep, and every ratio is against it, as in the main study (``python -m sbdata.bench``),
whose training loop, metrics and table this reuses. Runs go to ``--workers`` processes (one
torch thread each); the clock is each run's own process CPU time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

from . import report
from .__main__ import HYP, QUICK, dataset_once, run_one


def variant(
    keep: float, budget: float, interrupt: int = 0, policy: str = "rank", stale: int | str = "once", end: float = 1.0
) -> tuple[dict[str, Any], float]:
    """A recipe-shaped setting: ``(SelectiveBatchLoader kwargs without epochs, budget x plain)``."""
    kwargs: dict[str, Any] = dict(keep=keep, policy=policy, stale=stale, start=0.04, interrupt=interrupt)
    if end < 1.0:
        kwargs["end"] = end
    return kwargs, budget


#: name -> (kwargs, epoch budget as a multiple of plain training's)
VARIANTS: dict[str, tuple[dict[str, Any], float]] = {
    # around "lossless" (InfoBatch-style: every above-mean example, the rest of each batch's
    # keep drawn from the below-mean ones and up-weighted, a final full-data phase)
    "infobatch0.4-end.875-x1.25 (lossless)": variant(0.4, 1.25, policy="infobatch", end=0.875),
    "infobatch0.5-end.875-x1.5": variant(0.5, 1.5, policy="infobatch", end=0.875),
    "infobatch0.5-end.875-x1.25": variant(0.5, 1.25, policy="infobatch", end=0.875),
    "infobatch0.4-end.875-x1.5": variant(0.4, 1.5, policy="infobatch", end=0.875),
    "infobatch0.4-x1.5": variant(0.4, 1.5, policy="infobatch"),
    "infobatch0.5-x1.25": variant(0.5, 1.25, policy="infobatch"),
    "infobatch0.3-int8-x1.5": variant(0.3, 1.5, 8, policy="infobatch"),
    # rank selection for the same target
    "keep0.3-int8-x1.5": variant(0.3, 1.5, 8),
    "keep0.3-int8-x1.375": variant(0.3, 1.375, 8),
    "keep0.3-x1.5": variant(0.3, 1.5),
    "keep0.25-int8-x1.5": variant(0.25, 1.5, 8),
    "keep0.2-int4-x1.5": variant(0.2, 1.5, 4),
    "keep0.2-int8-x1.75": variant(0.2, 1.75, 8),
    "keep0.4-int8-x1.25": variant(0.4, 1.25, 8),
    "keep0.3-int8-x1.5-topk": variant(0.3, 1.5, 8, policy="topk"),
    "keep0.3-int8-x1.5-threshold": variant(0.3, 1.5, 8, policy="threshold"),
    "keep0.3-int8-x1.5-rescore4": variant(0.3, 1.5, 8, stale=4),
    "keep0.2-x1.75": variant(0.2, 1.75),
    "keep0.1-x3": variant(0.1, 3.0),
    # around "fast" (rank, a final full-data phase, plain's budget)
    "keep0.2-end.9-x1 (fast)": variant(0.2, 1.0, end=0.9),
    "keep0.12-x1.5": variant(0.12, 1.5),
    "keep0.1-x1.5": variant(0.1, 1.5),
    "keep0.1-x1.75": variant(0.1, 1.75),
    "keep0.15-int8-x1": variant(0.15, 1.0, 8),
    "keep0.3-int8-x0.75": variant(0.3, 0.75, 8),
}

def run_sweep(seeds: list[int], quick: bool, workers: int, data_dir: str | None = None) -> dict[str, Any]:
    """Run plain training and every variant for every seed; return curves and the summary."""
    hyp = {**HYP["mnist1d"], **(QUICK["mnist1d"] if quick else {})}
    plain_epochs = hyp["epochs"]
    plans: dict[str, tuple[dict[str, Any] | None, int]] = {"plain": (None, plain_epochs)}
    plans.update({name: (kw, max(1, round(b * plain_epochs))) for name, (kw, b) in VARIANTS.items()})
    dataset_once("mnist1d", hyp, data_dir)  # once, before the workers fork
    tasks = [
        ("mnist1d", name, {"kwargs": kw, "epochs": epochs, "record": kw is not None}, hyp, seed, data_dir, 1)
        for seed in seeds
        for name, (kw, epochs) in plans.items()
    ]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        results = pool.map(run_one, tasks, chunksize=1)
    methods: dict[str, dict[str, list]] = {name: {"seconds": [], "accuracy": []} for name in plans}
    for _, name, curve in results:
        methods[name]["seconds"].append(curve["cpu_seconds"])
        methods[name]["accuracy"].append(curve["accuracy"])
    return {
        "hyp": hyp,
        "epochs": {name: epochs for name, (_, epochs) in plans.items()},
        "kwargs": {name: kw for name, (kw, _) in plans.items()},
        "methods": methods,
        "summary": report.summarize(methods),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m sbdata.bench.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/sweep", help="output folder (default runs/sweep)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    parser.add_argument("--workers", type=int, default=2, help="parallel runs, one torch thread each (default 2)")
    parser.add_argument("--quick", action="store_true", help="tiny data and model: a smoke test")
    parser.add_argument("--data-dir", default=None, help="MNIST-1D cache folder (default ~/.cache/sbdata)")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    began = time.perf_counter()
    sweep = run_sweep(seeds, args.quick, args.workers, args.data_dir)
    minutes = (time.perf_counter() - began) / 60
    table = report.markdown_table(sweep["summary"], sweep["epochs"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({**sweep, "seeds": seeds, "minutes": minutes}, indent=1))
    (out / "sweep.md").write_text(
        f"# Recipe sweep (MNIST-1D)\n\n`python -m sbdata.bench.sweep --out {args.out}`, seeds {seeds}, "
        f"{args.workers} parallel runs, {minutes:.1f} min. CPU-time clock; ratios against plain "
        f"training in the same sweep.\n\n{table}\n"
    )
    print(table)
    print(f"\nwrote {out}/sweep.json, sweep.md ({minutes:.1f} min)")
    return sweep


if __name__ == "__main__":
    main()
