"""Resume check: run a loader uninterrupted and again with chained checkpoints, compare.

    python -m sbdata.bench.resume --out docs/bench/resume     # the grid of docs/resume.md (~45 min, busy 2 cores)
    python -m sbdata.bench.resume --quick                     # seconds

Used by the test suite (a small grid, tests/test_resume_grid.py) and by this command (a larger
one: more cut seeds, every kind of loader for every configuration).
A run is a list of yielded batches' example ids. The interrupted run, at each chosen step,
saves the loader's state, round-trips it through ``torch.save``/``torch.load(weights_only=True)``,
builds a brand-new loader (a new ``DataLoader`` and model too, with the global RNG reseeded to
something else, as a new process would have), loads the state, saves and loads it once more
(a checkpoint taken right after a resume), and goes on. Exact means the same ids in the same
batches, in the same order.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["chained_run", "main", "roundtrip", "run_grid", "uninterrupted_run"]

Make = Callable[[], Any]  # builds a fresh SelectiveBatchLoader over a fresh source


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _train_step(sb: Any, batch: Any, ids_of: Callable[[Any], torch.Tensor], step: int) -> list[int]:
    ids = ids_of(batch)
    sb.record((ids.double() * 7919 % 10007 + step).float())  # a known loss that changes over time
    return ids.tolist()


def uninterrupted_run(make: Make, epochs: int, ids_of: Callable[[Any], torch.Tensor]) -> list[list[int]]:
    sb, out = make(), []  # type: ignore[var-annotated]
    for _ in range(epochs):
        for batch in sb:
            out.append(_train_step(sb, batch, ids_of, len(out)))
    return out


def chained_run(
    make: Make, epochs: int, ids_of: Callable[[Any], torch.Tensor], cuts: Sequence[int], reseed: int = 12345
) -> list[list[int]]:
    """The same run, checkpointed and resumed in a new loader after each step in ``cuts``
    (0: before the first batch)."""
    cuts = sorted(set(cuts))
    out: list[list[int]] = []
    sb = make()

    def resume(sb: Any) -> Any:
        state = roundtrip(sb.state_dict())
        torch.manual_seed(reseed + len(out))  # a new process has other global random state
        fresh = make()
        fresh.load_state_dict(state)
        again = make()  # a checkpoint right after a resume, resumed once more
        again.load_state_dict(roundtrip(fresh.state_dict()))
        return again

    if cuts and cuts[0] == 0:
        sb = resume(sb)
    while sb.epoch < epochs:
        for batch in sb:
            out.append(_train_step(sb, batch, ids_of, len(out)))
            if len(out) in cuts:
                sb = resume(sb)
                break
    return out


# ---------------------------------------------------------------- the grid


class Indexed(Dataset):
    """Example i is ``(x = [i, i], y = i % 3, i)``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        return torch.tensor([float(i), float(i)]), i % 3, i


class Echo(nn.Module):
    """Scores each example by a fixed scramble of its id (read from x)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return x


def _id_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return (outputs[:, 0].long() * 7919 % 10007).float() + 1.0


POLICIES = ["rank", "topk", "random", "threshold", "infobatch"]
STALE: list[Any] = [None, 2, "once"]
SCHEDULES: dict[str, dict[str, Any]] = {"none": {}, "window": {"start": 0.25, "end": 0.75}, "interrupt": {"interrupt": 3}}
LAST = ["yield", "drop", "carry"]
KINDS = ["generator", "global", "workers", "persistent", "stateful", "list"]


def make_source(kind: str, n: int) -> Any:
    data = Indexed(n)
    g = torch.Generator().manual_seed(3)
    if kind == "generator":
        return DataLoader(data, batch_size=8, shuffle=True, generator=g)
    if kind == "global":
        return DataLoader(data, batch_size=8, shuffle=True)
    if kind in ("workers", "persistent"):
        return DataLoader(data, batch_size=8, shuffle=True, num_workers=2, persistent_workers=kind == "persistent")
    if kind == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(data, batch_size=8, shuffle=True, generator=g)
    if kind == "list":
        rows = [data[i] for i in range(n)]
        return [
            tuple(_stack([r[j] for r in rows[k : k + 8]]) for j in range(3))
            for k in range(0, n, 8)
        ]
    raise ValueError(f"kind must be one of {KINDS}, got kind={kind!r}")


def _stack(values: list[Any]) -> Tensor:
    return torch.stack(values) if isinstance(values[0], Tensor) else torch.tensor(values)


def maker(kind: str, epochs: int, n: int, **config: Any) -> Make:
    from sbdata import SelectiveBatchLoader

    if config.get("start") or config.get("end", 1.0) < 1.0:
        config["epochs"] = epochs
    extra: dict[str, Any] = {"index_key": 2} if kind == "list" else {}

    def make() -> Any:
        return SelectiveBatchLoader(make_source(kind, n), Echo(), keep=0.5, loss_fn=_id_loss, batch_size=6, **config, **extra)

    return make


def run_grid(kinds: Sequence[str], cut_seeds: int, epochs: int = 4, n: int = 45, cuts: int = 3) -> dict[str, Any]:
    """Every policy x stale x schedule x last_batch x kind, ``cut_seeds`` random sets of
    ``cuts`` checkpoints each. Returns counts and the failing cases."""
    tried = exact = runs = 0
    failures = []
    for policy, stale, schedule, last_batch, kind in itertools.product(POLICIES, STALE, SCHEDULES, LAST, kinds):
        make = maker(kind, epochs, n, policy=policy, stale=stale, last_batch=last_batch, **SCHEDULES[schedule])
        torch.manual_seed(0)
        expected = uninterrupted_run(make, epochs, lambda b: b[2])
        for seed in range(cut_seeds):
            chosen = random.Random(seed).sample(range(len(expected) + 1), k=min(cuts, len(expected) + 1))
            torch.manual_seed(0)
            ok = chained_run(make, epochs, lambda b: b[2], chosen) == expected
            runs += 1
            tried += len(chosen)
            exact += len(chosen) if ok else 0
            if not ok:
                case = {"policy": policy, "stale": stale, "schedule": schedule, "last_batch": last_batch, "kind": kind}
                failures.append({**case, "cuts": sorted(chosen)})
    return {"runs": runs, "checkpoints": tried, "exact": exact, "failures": failures}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two kinds of loader, one cut seed")
    parser.add_argument("--seeds", type=int, default=4, help="random sets of checkpoints per configuration")
    parser.add_argument("--out", default=None, help="folder for resume.json and resume.md")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    result = run_grid(["generator", "list"] if args.quick else KINDS, 1 if args.quick else args.seeds)
    result["seconds"] = round(time.perf_counter() - began, 1)
    line = (
        f"{result['exact']} of {result['checkpoints']} checkpoints resumed exactly "
        f"({result['runs']} chained runs, {len(result['failures'])} failing) in {result['seconds']} s"
    )
    print(line)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "resume.json").write_text(json.dumps(result, indent=1))
        (out / "resume.md").write_text(f"# Resume grid\n\n`python -m sbdata.bench.resume --out {args.out}`\n\n{line}\n")
    return result


if __name__ == "__main__":
    main()
