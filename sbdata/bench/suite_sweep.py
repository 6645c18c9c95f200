"""Recipe candidates on the suite's datasets, side by side with plain training and the peers.

    python -m sbdata.bench.suite_sweep --out runs/suite-sweep --seeds 0
    python -m sbdata.bench.suite_sweep --quick --out /tmp/suite-sweep

Each candidate of :data:`CANDIDATES` runs as ``variant:<name>`` in the suite's study (same
loop, clock, interleaving and per-seed report as ``python -m sbdata.bench --full``), next to
plain training, the InfoBatch peer and the two recipes as they stand. Run it with one seed
first, then confirm the promising candidates with ``--seeds 0 1``; a recipe changes only if a
candidate is better on the whole suite (docs/benchmarks.md).

The rounds behind the current recipes (docs/bench/suite-sweep/round*/):
  python -m sbdata.bench.suite_sweep --out docs/bench/suite-sweep/round1 --seeds 0 \\
      --datasets mnist-10k mnist-20k mnist-20k-aug mnist1d --candidates ib0.3-end.875-x1.5 \\
      ib0.4-end.875-x1.25 ib0.3-end.8-x1.25 rank0.2-x1 rank0.12-x1.25 rank0.2-end.9-x1
  python -m sbdata.bench.suite_sweep --out docs/bench/suite-sweep/round2 --seeds 1 \\
      --datasets mnist-10k mnist-20k mnist-20k-aug mnist1d --beside plain --candidates \\
      ib0.4-end.875-x1.25 ib0.5-end.875-x1 ib0.5-end.75-x1 rank0.2-end.9-x1 rank0.25-end.9-x0.75 rank0.15-end.9-x1.25
  python -m sbdata.bench.suite_sweep --out docs/bench/suite-sweep/round3 --seeds 1 \\
      --datasets mnist-10k mnist-20k mnist-20k-aug mnist1d --beside plain --candidates rank0.3-end.9-x1 \\
      prev-lossless-ib0.5-end.875-x1.5 prev-fast-rank0.12-x1.5
  python -m sbdata.bench.suite_sweep --out docs/bench/suite-sweep/round4 --seeds 0 \\
      --datasets mnist-10k mnist-20k mnist-20k-aug mnist1d --beside plain recipe:lossless recipe:fast \\
      --candidates ib0.4-start.2-end.875-x1.25 rank0.2-start.15-end.9-x1 rank0.2-stale3-end.9-x1
Rounds 1 and 3 ran the recipes of that time as ``recipe:lossless`` and ``recipe:fast``; the
``prev-*`` candidates are those settings (add them to round 1's ``--candidates`` to rerun it
as it ran; the command above runs today's recipes beside it).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __main__ as bench

#: name -> (SelectiveBatchLoader kwargs, epoch budget as a multiple of plain's).
CANDIDATES: dict[str, tuple[dict[str, Any], float]] = {
    # the recipes before this sweep (rounds 1 and 3 ran them as recipe:lossless and recipe:fast)
    "prev-lossless-ib0.5-end.875-x1.5": (dict(keep=0.5, policy="infobatch", stale="once", start=0.04, end=0.875), 1.5),
    "prev-fast-rank0.12-x1.5": (dict(keep=0.12, policy="rank", stale="once", start=0.04), 1.5),
    # around "lossless"
    "ib0.3-end.875-x1.5": (dict(keep=0.3, policy="infobatch", stale="once", start=0.04, end=0.875), 1.5),
    "ib0.4-end.875-x1.25": (dict(keep=0.4, policy="infobatch", stale="once", start=0.04, end=0.875), 1.25),
    "ib0.3-end.8-x1.25": (dict(keep=0.3, policy="infobatch", stale="once", start=0.04, end=0.8), 1.25),
    # around "fast"
    "rank0.2-x1": (dict(keep=0.2, policy="rank", stale="once", start=0.04), 1.0),
    "rank0.12-x1.25": (dict(keep=0.12, policy="rank", stale="once", start=0.04), 1.25),
    "rank0.2-end.9-x1": (dict(keep=0.2, policy="rank", stale="once", start=0.04, end=0.9), 1.0),
    # fifth round: InfoBatch's own draw (every above-mean example kept), by name
    "ibprune0.5-end.875-x1": (dict(keep=0.5, policy="infobatch-prune", stale="once", start=0.04, end=0.875), 1.0),
    "ibprune0.3-end.875-x1": (dict(keep=0.3, policy="infobatch-prune", stale="once", start=0.04, end=0.875), 1.0),
    # second round, after the first on seed 0
    "ib0.5-end.875-x1": (dict(keep=0.5, policy="infobatch", stale="once", start=0.04, end=0.875), 1.0),
    "ib0.5-end.75-x1": (dict(keep=0.5, policy="infobatch", stale="once", start=0.04, end=0.75), 1.0),
    "rank0.25-end.9-x0.75": (dict(keep=0.25, policy="rank", stale="once", start=0.04, end=0.9), 0.75),
    "rank0.15-end.9-x1.25": (dict(keep=0.15, policy="rank", stale="once", start=0.04, end=0.9), 1.25),
    # third round
    "rank0.3-end.9-x1": (dict(keep=0.3, policy="rank", stale="once", start=0.04, end=0.9), 1.0),
    # fourth round (after the suite): a longer plain warm-up, periodic rescoring
    "ib0.4-start.2-end.875-x1.25": (dict(keep=0.4, policy="infobatch", stale="once", start=0.2, end=0.875), 1.25),
    "rank0.2-start.15-end.9-x1": (dict(keep=0.2, policy="rank", stale="once", start=0.15, end=0.9), 1.0),
    "rank0.2-stale3-end.9-x1": (dict(keep=0.2, policy="rank", stale=3, start=0.04, end=0.9), 1.0),
}

#: What runs beside the candidates.
BESIDE = ("plain", "plain-half", "rs2", "infobatch-peer", "recipe:lossless", "recipe:fast")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m sbdata.bench.suite_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/suite-sweep")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--datasets", nargs="+", default=list(bench.HYP), choices=list(bench.HYP))
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--beside", nargs="+", default=list(BESIDE), help=f"methods beside them (default {' '.join(BESIDE)})")
    parser.add_argument("--quick", action="store_true", help="tiny data and models: a smoke test")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    saved = dict(bench.VARIANTS)
    bench.VARIANTS.clear()
    bench.VARIANTS.update({name: CANDIDATES[name] for name in args.candidates})
    try:
        only = [*args.beside, *(f"variant:{name}" for name in args.candidates)]
        studies = bench.run_study(args.datasets, args.seeds, args.quick, None, only=only, show_progress=not args.no_progress)
    finally:
        bench.VARIANTS.clear()
        bench.VARIANTS.update(saved)
    meta = {
        "command": "python -m sbdata.bench.suite_sweep " + " ".join(argv if argv is not None else sys.argv[1:]),
        "mode": "suite-sweep",
        "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores), 1 torch thread per run, one run at a time",
        "seeds": args.seeds,
        "minutes": (time.perf_counter() - began) / 60,
        "candidates": {name: CANDIDATES[name] for name in args.candidates},
    }
    bench.write(studies, Path(args.out), meta)
    md = Path(args.out) / "results.md"
    md.write_text(md.read_text().replace("# sbdata time-to-accuracy study", "# Recipe sweep on the suite", 1))
    for dataset, study in studies.items():
        print(f"\n{dataset}, per seed\n" + bench.report.per_seed_table(study["per_seed"], bench._epochs(study)))
    print(f"\nwrote {args.out}/results.json, results.md; {meta['minutes']:.1f} min")
    return studies


if __name__ == "__main__":
    main()
