"""The benchmark's training loop: one plain loop that every method runs through.

A method is a dict of ``SelectiveBatchLoader`` keyword arguments (``None`` for plain training,
which iterates the DataLoader itself) plus its own epoch budget. The loop is the one a user
writes; the only sbdata-specific lines are the optional ``record()`` call and the per-example
weights of reweighting policies (InfoBatch).

NOTE [ What the clock counts ]
The clock runs from the start of training to the end of each epoch, and is paused while the
test set is evaluated after every epoch. Scoring passes happen inside the loader's iteration,
so they are on the clock; model construction and data generation are not. Two clocks run side
by side: wall-clock (``time.perf_counter``) and the process's CPU time (``time.process_time``).
With one torch thread and no loader workers the two agree on an idle machine; on a shared
machine the CPU time is what the run would take on a core of its own, while the wall-clock
also counts the time other processes held the core.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from sbdata import SelectiveBatchLoader

__all__ = ["Curve", "TensorBatches", "lr_factor", "make_loader", "make_model", "train"]


#####  Data  #####


class TensorBatches(Dataset):
    """In-memory ``(x, y)`` tensors that a DataLoader fetches a whole batch at a time.

    ``__getitems__`` gathers a batch with one indexing op instead of ``batch_size`` calls to
    ``__getitem__`` plus a collate; with ``collate_fn=_as_is`` the loader hands it on as it is.
    It is still a map-style dataset, so stale epochs can load only the ids they keep.
    """

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, ids: list[int]) -> tuple[Tensor, Tensor]:
        ids_t = torch.as_tensor(ids, dtype=torch.long)
        return self.x[ids_t], self.y[ids_t]


def _as_is(batch: Any) -> Any:
    return batch


def make_loader(x: Tensor, y: Tensor, batch_size: int, seed: int) -> DataLoader:
    """A shuffling DataLoader over in-memory tensors; its generator fixes the order per seed."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorBatches(x, y), batch_size=batch_size, shuffle=True, generator=generator, collate_fn=_as_is
    )


#####  Models  #####


def make_model(kind: str, width: int, num_classes: int = 10) -> nn.Module:
    """``"cnn1d"``: a 1-D CNN for MNIST-1D signals (N, 1, 40); ``"cnn2d"``: a 2-D CNN for 8x8
    digits (N, 1, 8, 8). Both end in global average pooling, so they accept the smaller inputs
    of a ``scale_factor < 1`` scoring pass."""
    conv: Any
    norm: Any
    pool: Any
    if kind == "cnn1d":
        conv, norm, pool = nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d
    elif kind == "cnn2d":
        conv, norm, pool = nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d
    else:
        raise ValueError(f"kind must be 'cnn1d' or 'cnn2d', got kind={kind!r}")

    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [conv(c_in, c_out, 3, stride=stride, padding=1, bias=False), norm(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, width, 1),
        *block(width, width, 2 if kind == "cnn1d" else 1),
        *block(width, 2 * width, 2),
        *block(2 * width, 2 * width, 1),
        pool(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


#####  Schedule  #####


def lr_factor(progress: float, warmup: float = 0.1) -> float:
    """Linear warm-up over the first ``warmup`` of training, then linear decay to 0.

    ``progress`` is the fraction of the method's *own* epoch budget done, so every method
    gets the same schedule shape stretched over its own number of epochs.
    """
    if progress < warmup:
        return (progress + 1e-3) / warmup
    return max(0.0, (1.0 - progress) / (1.0 - warmup))


#####  Training  #####


@dataclass
class Curve:
    """Test accuracy after every epoch against the training clock (seconds)."""

    seconds: list[float] = field(default_factory=list)  # wall-clock
    cpu_seconds: list[float] = field(default_factory=list)  # process CPU time
    accuracy: list[float] = field(default_factory=list)
    backprops: list[int] = field(default_factory=list)  # examples trained on, cumulative
    scored: list[int] = field(default_factory=list)  # examples in scoring passes, cumulative
    selected: list[int] = field(default_factory=list)  # examples the policy kept, cumulative
    candidates: list[int] = field(default_factory=list)  # examples it chose from, cumulative


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 2048) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / len(y)


def train(
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    hyp: dict[str, Any],
    method: dict[str, Any] | None,
    *,
    epochs: int,
    seed: int,
    record: bool = False,
    progress: Any = None,
) -> Curve:
    """Train one model with one method and return its accuracy-against-time curve.

    Args:
        data: ``(x_train, y_train, x_test, y_test)``.
        hyp: ``model``, ``width``, ``batch_size``, ``lr``, ``weight_decay``.
        method: ``SelectiveBatchLoader`` keyword arguments, or ``None`` for plain training
            (the DataLoader is iterated directly).
        epochs: this method's own epoch budget; the LR schedule spans it.
        seed: seeds the weights, the shuffling and the selection.
        record: feed the training losses back with ``sb.record()`` after every batch of every
            epoch, plain (warm-up) epochs included: stale recipes use these instead of scoring
            passes, and a cache filled before the first selective epoch spares its scoring pass.
        progress: a tqdm-like bar to ``update(1)`` after every epoch, or ``None``.
    """
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = make_model(hyp["model"], hyp["width"])
    opt = torch.optim.AdamW(model.parameters(), lr=hyp["lr"], weight_decay=hyp["weight_decay"])
    loader: Any = make_loader(x_train, y_train, hyp["batch_size"], seed)
    sb = None
    if method is not None:
        sb = SelectiveBatchLoader(loader, model, **{**method, "epochs": epochs, "seed": seed})
        if sb.policy.reweights and not record:
            raise ValueError(f"{sb.policy!r} reweights examples, which only sb.record() applies: pass record=True")
        loader = sb
    curve, clock, cpu_clock = Curve(), 0.0, 0.0
    for epoch in range(epochs):
        began, cpu_began = time.perf_counter(), time.process_time()
        model.train()
        steps = max(len(loader), 1)  # exact: the epoch's own length
        for i, (x, y) in enumerate(loader):
            for group in opt.param_groups:
                group["lr"] = hyp["lr"] * lr_factor((epoch + min(i / steps, 1.0)) / epochs)
            losses = F.cross_entropy(model(x), y, reduction="none")
            if sb is not None and record:
                losses = sb.record(losses)  # weighted by the batch's weights for reweighting policies
            loss = losses.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        clock += time.perf_counter() - began  # NOTE [ What the clock counts ]: eval is off the clock
        cpu_clock += time.process_time() - cpu_began
        curve.seconds.append(clock)
        curve.cpu_seconds.append(cpu_clock)
        curve.accuracy.append(evaluate(model, x_test, y_test))
        stats = sb.stats.history[-1] if sb is not None else None
        counts = {
            "backprops": stats.yielded if stats else len(y_train),
            "scored": stats.scored if stats else 0,
            "selected": stats.selected if stats else 0,
            "candidates": stats.candidates if stats else 0,
        }
        for name, count in counts.items():  # the curves count cumulatively
            series = getattr(curve, name)
            series.append((series[-1] if series else 0) + count)
        if progress is not None:
            progress.update(1)
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError(f"training diverged at epoch {epoch}: loss={float(loss.detach())}")
    return curve
