"""Micro-benchmarks: wrapper overhead, stale-epoch loading, and cheaper scoring.

    python -m sbdata.bench.micro                 # ~3 min on a 2-core CPU
    python -m sbdata.bench.micro --quick         # a few seconds

1. **Wrapper overhead.** ``SelectiveBatchLoader(keep=0.5, policy="rank")`` against the same
   selection written by hand in the loop (score under ``no_grad`` in eval mode, ``rank_select``,
   gather, re-pack into full batches), on the same DataLoader and model, alternating epochs in
   one process. Timed twice: iterating only (the data path alone, the harshest view), and with
   a training step per yielded batch (what a user sees). Goal: ratio <= 1.05.
2. **Stale-epoch loading** with JPEG decoding: :func:`sbdata.bench.stale_loading.run`. Goal: a
   stale epoch takes <= keep + 0.05 of a full epoch's loading time.
3. **Scoring cost at** ``scale_factor=0.5`` against full resolution: the scoring pass
   (:func:`sbdata.scoring.score_inputs`) of a small 2-D CNN on a synthetic image batch.

Every timing is the median of alternating repetitions; ratios are what is reported. Benchmarks
1 and 3 run in this process with one torch thread and no loader workers, so they are timed in
process CPU time (``time.process_time``), which other processes on a shared machine disturb far
less than the wall-clock; benchmark 2 has loader worker processes and is timed by the wall-clock.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sbdata import SelectiveBatchLoader
from sbdata.policies import rank_select
from sbdata.scoring import score_inputs

from . import stale_loading
from .train import make_loader, make_model

#####  1. Wrapper overhead  #####


def hand_selected(
    loader: Any, model: nn.Module, keep: float, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """The selection a user would write by hand: what SelectiveBatchLoader replaces."""
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    pending = 0
    for x, y in loader:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            losses = F.cross_entropy(model(x), y, reduction="none")
        model.train(was_training)
        rows = rank_select(losses, keep, generator)
        xs.append(x[rows])
        ys.append(y[rows])
        pending += rows.numel()
        while pending >= batch_size:
            x_all, y_all = torch.cat(xs), torch.cat(ys)
            yield x_all[:batch_size], y_all[:batch_size]
            xs, ys = [x_all[batch_size:]], [y_all[batch_size:]]
            pending -= batch_size
    if pending:
        yield torch.cat(xs), torch.cat(ys)


def _epoch_seconds(batches: Iterator[tuple[Tensor, Tensor]], step: Callable[[Tensor, Tensor], None] | None) -> float:
    began = time.process_time()
    for x, y in batches:
        if step is not None:
            step(x, y)
    return time.process_time() - began


def wrapper_overhead(examples: int, reps: int, keep: float = 0.5, batch_size: int = 128) -> dict[str, Any]:
    from sbdata.datasets import load_mnist1d

    x, y, _, _ = load_mnist1d(num_samples=60000)
    x, y = x[:examples], y[:examples]
    model = make_model("cnn1d", 32)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(xb: Tensor, yb: Tensor) -> None:
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out: dict[str, Any] = {"examples": examples, "keep": keep, "batch_size": batch_size, "reps": reps}
    for label, train_step in (("iterate_only", None), ("with_training_step", step)):
        sb = SelectiveBatchLoader(make_loader(x, y, batch_size, seed=0), model, keep=keep, policy="rank")
        plain_loader = make_loader(x, y, batch_size, seed=0)
        generator = torch.Generator().manual_seed(0)
        _epoch_seconds(iter(sb), train_step)  # warm-up, both
        _epoch_seconds(hand_selected(plain_loader, model, keep, batch_size, generator), train_step)
        wrapped, by_hand = [], []
        for _ in range(reps):
            wrapped.append(_epoch_seconds(iter(sb), train_step))
            by_hand.append(_epoch_seconds(hand_selected(plain_loader, model, keep, batch_size, generator), train_step))
        out[label] = {
            "sbdata_s": statistics.median(wrapped),
            "by_hand_s": statistics.median(by_hand),
            "ratio": statistics.median(wrapped) / statistics.median(by_hand),
        }
    return out


#####  3. Scoring at scale_factor=0.5  #####


def scoring_cost(batch: int, size: int, reps: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    inputs = torch.rand(batch, 3, size, size, generator=gen)
    targets = torch.randint(0, 10, (batch,), generator=gen)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip
    loss_fn = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    times: dict[float, list[float]] = {1.0: [], 0.5: []}
    for factor in times:  # warm-up
        score_inputs(model, inputs, targets, loss_fn, scale_factor=factor)
    for _ in range(reps):
        for factor in times:
            began = time.process_time()
            score_inputs(model, inputs, targets, loss_fn, scale_factor=factor)
            times[factor].append(time.process_time() - began)
    full, half = statistics.median(times[1.0]), statistics.median(times[0.5])
    return {"batch": batch, "image": [3, size, size], "full_s": full, "half_s": half, "ratio": half / full}


#####  Main  #####


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m sbdata.bench.micro", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--out", default="runs/micro", help="output folder for micro.json (default runs/micro)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    q = args.quick
    results = {
        "wrapper_overhead": wrapper_overhead(examples=2048 if q else 24000, reps=2 if q else 7),
        "stale_loading": stale_loading.run(
            n=256 if q else 4000, size=32 if q else 128, batch_size=64, keep=0.5, reps=2 if q else 5, num_workers=2
        ),
        "scoring_scale_factor": scoring_cost(batch=64 if q else 256, size=32 if q else 64, reps=3 if q else 15),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "micro.json").write_text(json.dumps(results, indent=1))
    w, s, c = results["wrapper_overhead"], results["stale_loading"], results["scoring_scale_factor"]
    print(json.dumps(results, indent=1))
    print(f"wrapper overhead (iterate only): {w['iterate_only']['ratio']:.3f}x hand-written (goal <= 1.05)")
    print(f"wrapper overhead (with a training step): {w['with_training_step']['ratio']:.3f}x hand-written (goal <= 1.05)")
    print(f"stale epoch loading: {s['ratio']:.3f} of a full epoch at keep={s['keep']} (goal <= {s['keep'] + 0.05:.2f})")
    print(f"scoring at scale_factor=0.5: {c['ratio']:.3f} of full-resolution scoring time")
    return results


if __name__ == "__main__":
    main()
