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

__all__ = ["PEERS", "Curve", "TensorBatches", "lr_factor", "make_dataset", "make_loader", "make_model", "make_optimizer", "train"]


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


def make_dataset(x: Tensor, y: Tensor, augment: int = 0, seed: int = 0) -> Dataset:
    """The training set: :class:`TensorBatches`, or, for ``augment > 0``, images shifted at
    random by up to ``augment`` pixels, anew every epoch (:class:`~sbdata.bench.images.ShiftedImages`)."""
    if augment:
        from .images import ShiftedImages

        return ShiftedImages(x, y, pad=augment, seed=seed)
    return TensorBatches(x, y)


def make_loader(x: Tensor, y: Tensor, batch_size: int, seed: int, augment: int = 0) -> DataLoader:
    """A shuffling DataLoader over in-memory tensors; its generator fixes the order per seed."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        make_dataset(x, y, augment, seed), batch_size=batch_size, shuffle=True, generator=generator, collate_fn=_as_is
    )


#####  Models  #####


def make_model(kind: str, width: int, num_classes: int = 10) -> nn.Module:
    """``"cnn1d"``: a 1-D CNN for MNIST-1D signals (N, 1, 40); ``"cnn2d"``: a 2-D CNN for 8x8
    digits (N, 1, 8, 8); ``"cnn28"``: the same 2-D CNN with a stride-2 first layer and a fifth,
    stride-2 block of width ``4 * width``, for 28x28 images (28 -> 14 -> 7 -> 4). All end in
    global average pooling, so they accept the smaller inputs of a ``scale_factor < 1``
    scoring pass."""
    conv: Any
    norm: Any
    pool: Any
    if kind == "cnn1d":
        conv, norm, pool = nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d
    elif kind in ("cnn2d", "cnn28"):
        conv, norm, pool = nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d
    else:
        raise ValueError(f"kind must be 'cnn1d', 'cnn2d' or 'cnn28', got kind={kind!r}")

    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [conv(c_in, c_out, 3, stride=stride, padding=1, bias=False), norm(c_out), nn.ReLU()]

    first, second = (2, 1) if kind == "cnn28" else (1, 2) if kind == "cnn1d" else (1, 1)
    layers = [*block(1, width, first), *block(width, width, second), *block(width, 2 * width, 2), *block(2 * width, 2 * width, 1)]
    top = 2 * width
    if kind == "cnn28":  # one more stride-2 block (7 -> 4): a receptive field that spans the digit
        layers += block(2 * width, 4 * width, 2)
        top = 4 * width
    return nn.Sequential(*layers, pool(1), nn.Flatten(), nn.Linear(top, num_classes))


#####  Schedule  #####


def lr_factor(progress: float, warmup: float = 0.1, shape: str = "linear") -> float:
    """The LR as a fraction of its peak at ``progress`` through training.

    ``shape="linear"``: linear warm-up over the first ``warmup`` of training, then linear decay
    to 0. ``shape="onecycle"``: OneCycle's (``torch.optim.lr_scheduler.OneCycleLR`` with its
    defaults but ``pct_start=warmup``): linear from 1/25 of the peak up to it over the first
    ``warmup``, then cosine annealing to 0.

    ``progress`` is the fraction of the method's *own* epoch budget done, so every method
    gets the same schedule shape stretched over its own number of epochs.
    """
    if shape == "onecycle":
        if progress < warmup:
            return 0.04 + 0.96 * progress / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup) / (1.0 - warmup))))
    if shape != "linear":
        raise ValueError(f"shape must be 'linear' or 'onecycle', got shape={shape!r}")
    if progress < warmup:
        return (progress + 1e-3) / warmup
    return max(0.0, (1.0 - progress) / (1.0 - warmup))


def make_optimizer(model: nn.Module, hyp: dict[str, Any]) -> torch.optim.Optimizer:
    """``hyp["optimizer"]``: ``"adamw"`` (the default) or ``"sgd"`` (momentum ``hyp["momentum"]``,
    0.9 by default, Nesterov), at ``hyp["lr"]`` with ``hyp["weight_decay"]``."""
    kind = hyp.get("optimizer", "adamw")
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=hyp["lr"], weight_decay=hyp["weight_decay"])
    if kind == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=hyp["lr"], momentum=hyp.get("momentum", 0.9), nesterov=True, weight_decay=hyp["weight_decay"]
        )
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {kind!r}")


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


#: Peer baselines that run their own sampler instead of SelectiveBatchLoader
#: (``sbdata/bench/infobatch_peer.py``).
PEERS = ("rs2", "infobatch-peer")


def _peer_batches(peer: Any, dataset: Any, epoch: int, batch_size: int) -> tuple[list[Any], Tensor | None]:
    """The batches of ids of a peer's epoch and its per-example weights (``None``: all 1)."""
    from .infobatch_peer import InfoBatchPeer

    if isinstance(peer, InfoBatchPeer):
        order, weights = peer.plan(epoch)
        return list(order.split(batch_size)), weights
    peer.set_epoch(epoch)  # RS2Sampler
    return list(peer.ids(epoch).split(batch_size)), None


def train(
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    hyp: dict[str, Any],
    method: dict[str, Any] | None,
    *,
    epochs: int,
    seed: int,
    record: bool = False,
    progress: Any = None,
    peer: str | None = None,
) -> Curve:
    """Train one model with one method and return its accuracy-against-time curve.

    Args:
        data: ``(x_train, y_train, x_test, y_test)``.
        hyp: ``model``, ``width``, ``batch_size``, ``lr``, ``weight_decay``; optionally
            ``optimizer`` (``"adamw"``, ``"sgd"``), ``momentum``, ``schedule`` (the
            :func:`lr_factor` shape), ``warmup`` and ``augment`` (random-shift padding, pixels).
        method: ``SelectiveBatchLoader`` keyword arguments, or ``None`` for plain training
            (the DataLoader is iterated directly); for a ``peer``, that peer's own arguments.
        epochs: this method's own epoch budget; the LR schedule spans it.
        seed: seeds the weights, the shuffling and the selection.
        record: feed the training losses back with ``sb.record()`` after every batch of every
            epoch, plain (warm-up) epochs included: stale recipes use these instead of scoring
            passes, and a cache filled before the first selective epoch spares its scoring pass.
        progress: a tqdm-like bar to ``update(1)`` after every epoch, or ``None``.
        peer: ``"rs2"`` (``method``: ``{"fraction": f}``) or ``"infobatch-peer"`` (``{"r": r,
            "delta": d}``): a peer baseline's own sampler (``sbdata/bench/infobatch_peer.py``)
            instead of ``SelectiveBatchLoader``, in the same loop and on the same clock.
    """
    from .infobatch_peer import InfoBatchPeer, RS2Sampler

    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = make_model(hyp["model"], hyp["width"])
    opt = make_optimizer(model, hyp)
    schedule = dict(warmup=hyp.get("warmup", 0.1), shape=hyp.get("schedule", "linear"))
    loader: Any = make_loader(x_train, y_train, hyp["batch_size"], seed, hyp.get("augment", 0))
    dataset = loader.dataset
    sb = None
    peer_sampler: Any = None
    if peer is not None:
        options = dict(method or {})
        if peer == "rs2":
            peer_sampler = RS2Sampler(len(y_train), options.get("fraction", 0.5), seed=seed)
        elif peer == "infobatch-peer":
            r, delta = options.get("r", 0.5), options.get("delta", 0.875)
            peer_sampler = InfoBatchPeer(len(y_train), epochs, r=r, delta=delta, seed=seed)
        else:
            raise ValueError(f"peer must be one of {PEERS}, got peer={peer!r}")
    elif method is not None:
        sb = SelectiveBatchLoader(loader, model, **{**method, "epochs": epochs, "seed": seed})
        if sb.policy.reweights and not record:
            raise ValueError(f"{sb.policy!r} reweights examples, which only sb.record() applies: pass record=True")
        loader = sb
    curve, clock, cpu_clock = Curve(), 0.0, 0.0
    for epoch in range(epochs):
        began, cpu_began = time.perf_counter(), time.process_time()
        model.train()
        if hasattr(dataset, "set_epoch"):  # per-epoch augmentation (ShiftedImages)
            dataset.set_epoch(epoch)
        weights = None
        trained = 0
        if peer_sampler is not None:  # the peer's own loop: batches of ids, fetched whole
            id_batches, weights = _peer_batches(peer_sampler, dataset, epoch, hyp["batch_size"])
            batches: Any = ((ids, *dataset.__getitems__(ids.tolist())) for ids in id_batches)
            steps = max(len(id_batches), 1)
        else:
            batches = ((None, x, y) for x, y in loader)
            steps = max(len(loader), 1)  # exact: the epoch's own length
        for i, (ids, x, y) in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = hyp["lr"] * lr_factor((epoch + min(i / steps, 1.0)) / epochs, **schedule)
            losses = F.cross_entropy(model(x), y, reduction="none")
            if sb is not None and record:
                losses = sb.record(losses)  # weighted by the batch's weights for reweighting policies
            elif isinstance(peer_sampler, InfoBatchPeer):
                peer_sampler.update(ids, losses)  # scores: the unweighted losses
                losses = losses * weights[ids]  # type: ignore[index]
            loss = losses.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            trained += len(y)
        clock += time.perf_counter() - began  # NOTE [ What the clock counts ]: eval is off the clock
        cpu_clock += time.process_time() - cpu_began
        curve.seconds.append(clock)
        curve.cpu_seconds.append(cpu_clock)
        curve.accuracy.append(evaluate(model, x_test, y_test))
        stats = sb.stats.history[-1] if sb is not None else None
        counts = {
            "backprops": stats.yielded if stats else trained,
            "scored": stats.scored if stats else 0,
            "selected": stats.selected if stats else 0,
            "candidates": stats.candidates if stats else 0,
        }
        if isinstance(peer_sampler, InfoBatchPeer) and peer_sampler.prunes(epoch):
            counts["selected"], counts["candidates"] = peer_sampler.history[-1]["kept"], len(y_train)
        for name, count in counts.items():  # the curves count cumulatively
            series = getattr(curve, name)
            series.append((series[-1] if series else 0) + count)
        if progress is not None:
            progress.update(1)
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError(f"training diverged at epoch {epoch}: loss={float(loss.detach())}")
    return curve
