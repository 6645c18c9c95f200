"""A map-style ``torch.utils.data.DataLoader`` as a source that loads chosen ids.

The user's DataLoader is rebuilt once, every argument kept, with a :class:`PlannedBatchSampler`
in place of its batch sampler. Each epoch, sbdata first draws the epoch's id batches from the
user's own batch sampler (:meth:`DataLoaderSource.candidates`), then has the rebuilt loader
load exactly the id batches it chose: all of them in plain and fresh epochs, only the selected
ids in stale epochs. Batch ``k`` of a pass holds plan ``k``'s ids, so ids never need probing.

NOTE [ Orders that resume ]
A mid-epoch resume must not shift the random state that later epochs draw their order from,
and a resumed process starts with other random state than the run it continues. So sbdata
makes every epoch's order a pure function of one seed and the epoch, as ``DistributedSampler``
does: where the user's sampler draws from a ``generator`` (``RandomSampler``,
``SubsetRandomSampler``, ``WeightedRandomSampler``), each epoch's draw uses a generator seeded
from the sampler's own seed (its generator's ``initial_seed()``, or, with no generator, one
number drawn from the global RNG when the loader is wrapped) and the epoch; that seed is saved
in checkpoints. The rebuilt loader gets a private generator for its workers' base seed, seeded
the same way, so sbdata never draws from the global RNG or the user's generator after wrapping.

NOTE [ One worker pool ]
Only the rebuilt loader is ever iterated. If the user's loader already has a persistent worker
pool (it was iterated before being wrapped), that pool is shut down at wrapping time, so a job
never holds two pools of workers (and two copies of the dataset per worker).
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from .base import Source, close_iterator, dataloader_batch_sizes, forward_set_epoch

__all__ = [
    "DataLoaderSource",
    "PlannedBatchSampler",
    "drawn_in_one",
    "drawn_with",
    "epoch_order_generator",
    "order_seed",
    "rebuildable",
]


class PlannedBatchSampler:
    """A batch sampler that yields the id batches it was last given (one pass per plan).

    It looks like the user's batch sampler (``batch_size``, ``drop_last``, ``sampler``), which
    ``inner`` keeps; ``set_epoch`` is forwarded to it.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.batch_size = getattr(inner, "batch_size", None)
        self.drop_last = getattr(inner, "drop_last", False)
        self.sampler = getattr(inner, "sampler", None)
        self._plan: Iterator[Tensor] = iter(())
        self._pass: Iterator[list[int]] | None = None
        self.issued: collections.deque[Tensor] = collections.deque()  # handed to the loader, not yet loaded

    def set_plan(self, plan: Iterable[Tensor]) -> None:
        """The id batches of the next pass; ``plan`` is read lazily, one batch per request."""
        self.end_pass()
        self._plan = iter(plan)

    def end_pass(self) -> None:
        """Let go of the current pass and its plan now (a persistent worker pool's iterator
        would otherwise keep an unfinished pass, and what its plan refers to, until its next epoch)."""
        if self._pass is not None:
            self._pass.close()  # type: ignore[attr-defined]
            self._pass = None
        self._plan = iter(())
        self.issued.clear()

    def set_epoch(self, epoch: int) -> None:
        forward_set_epoch(self.inner, epoch)

    def __iter__(self) -> Iterator[list[int]]:
        self._pass = self._batches()
        return self._pass

    def _batches(self) -> Iterator[list[int]]:
        # takes the plan at its first next(): torch's worker iterator calls iter() twice and uses the second
        plan, self._plan = self._plan, iter(())
        for ids in plan:
            ids = torch.as_tensor(ids, dtype=torch.long)
            self.issued.append(ids)
            yield ids.tolist()

    def __len__(self) -> int:
        return len(self.inner)  # the user's epoch: an upper bound of any plan's batches


_BATCHING_ARGS = {"dataset", "batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"}


def rebuildable(loader: Any) -> bool:
    """A map-style ``DataLoader`` (exactly that type) or torchdata's ``StatefulDataLoader``."""
    types: list[type] = [DataLoader]
    with contextlib.suppress(ImportError):
        from torchdata.stateful_dataloader import StatefulDataLoader

        types.append(StatefulDataLoader)
    return type(loader) in types and not isinstance(loader.dataset, IterableDataset)


def _rebuild(loader: DataLoader, batch_sampler: PlannedBatchSampler) -> DataLoader:
    """The same loader with ``batch_sampler`` swapped in; every other argument is kept."""
    cls = type(loader)
    kwargs: dict[str, Any] = {}
    for name in inspect.signature(cls.__init__).parameters:
        if name in _BATCHING_ARGS or name == "self" or not hasattr(loader, name):
            continue
        kwargs[name] = getattr(loader, name)
    if kwargs.get("num_workers", 0) == 0:
        kwargs.pop("prefetch_factor", None)
        kwargs["persistent_workers"] = False
    if kwargs.get("in_order") is False:
        # Batch k of a pass must hold plan k's ids; out-of-order delivery would break that.
        warnings.warn(
            "in_order=False reorders batches, so their ids could not be known; sbdata rebuilds "
            "the loader with in_order=True",
            stacklevel=5,
        )
        kwargs["in_order"] = True
    return cls(loader.dataset, batch_sampler=batch_sampler, **kwargs)


def release_workers(loader: DataLoader) -> None:
    """Shut down a DataLoader's persistent worker pool, if it has one (NOTE [ One worker pool ])."""
    it = getattr(loader, "_iterator", None)  # torch keeps the persistent iterator here
    shutdown = getattr(it, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()
    if it is not None:
        loader._iterator = None


class DataLoaderSource(Source):
    """A map-style DataLoader, rebuilt with a :class:`PlannedBatchSampler`."""

    loads_ids = True

    def __init__(self, loader: DataLoader) -> None:
        super().__init__(loader)
        self._original = loader
        self.sampler = PlannedBatchSampler(loader.batch_sampler)
        self.loader = _rebuild(loader, self.sampler)
        self.loader.generator = torch.Generator()  # NOTE [ Orders that resume ]: worker base seeds
        release_workers(loader)
        self._random = _random_sampler(loader.batch_sampler)
        self.order_seed = order_seed(self._random)
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        return {"order_seed": self.order_seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order_seed = int(state["order_seed"])

    @property
    def original(self) -> Any:
        return self._original

    def batch_sizes(self) -> list[int] | None:
        computed = dataloader_batch_sizes(self._original)
        return computed if computed is not None else self._observed_sizes

    def candidates(self) -> list[Tensor]:
        """This epoch's id batches, as the user's own batch sampler draws them (from a
        generator seeded by the epoch where it draws at random: NOTE [ Orders that resume ])."""
        random = self._random
        generator = epoch_order_generator(self.order_seed, self._epoch)
        fast = drawn_in_one(self.sampler.inner, generator)
        if fast is not None:
            return fast
        return drawn_with(random, generator, lambda: [torch.as_tensor(b, dtype=torch.long) for b in self.sampler.inner])

    @contextlib.contextmanager
    def epoch(self) -> Iterator[Iterator[tuple[Any, Tensor | None]]]:
        with self.load(self.candidates()) as pairs:
            yield pairs

    @property
    def reproducible_order(self) -> bool:  # type: ignore[override]
        """Random samplers draw from a per-epoch generator (NOTE [ Orders that resume ]); torch's
        sequential and distributed samplers are pure functions of their seed and epoch."""
        sampler = getattr(self.sampler.inner, "sampler", None)
        return self._random is not None or type(sampler) in (SequentialSampler, DistributedSampler)

    @contextlib.contextmanager
    def load(self, plan: Iterable[Tensor]) -> Iterator[Iterator[tuple[Any, Tensor]]]:
        self.sampler.set_plan(plan)
        self.loader.generator.manual_seed(_mix(self.order_seed, self._epoch, 1))
        it = iter(self.loader)
        try:
            yield ((batch, self.sampler.issued.popleft()) for batch in it)
        finally:
            close_iterator(it)
            self.sampler.end_pass()


def drawn_with(random: Any, generator: torch.Generator, draw: Callable[[], list[Tensor]]) -> list[Tensor]:
    """``draw()`` with the ``random`` sampler (``None``: none draws at random) drawing from
    ``generator`` instead of its own, which is given back afterwards (NOTE [ Orders that resume ])."""
    if random is None:
        return draw()
    saved = random.generator
    random.generator = generator
    try:
        return draw()
    finally:
        random.generator = saved


def drawn_in_one(batch_sampler: Any, generator: torch.Generator) -> list[Tensor] | None:
    """The id batches of torch's own ``BatchSampler`` over a ``SequentialSampler``,
    ``RandomSampler`` (drawing from ``generator``) or ``DistributedSampler``, computed as one
    tensor and split, instead of iterating the samplers in Python example by example: exactly
    what they would yield (``tests/test_scale.py`` compares), about as fast as the first batch
    of a plain epoch. ``None`` for any other sampler."""
    if type(batch_sampler) is not BatchSampler:
        return None
    sampler, order = batch_sampler.sampler, None
    if type(sampler) is SequentialSampler:
        order = torch.arange(len(sampler.data_source))
    elif type(sampler) is RandomSampler and not sampler.replacement:
        n, wanted = len(sampler.data_source), sampler.num_samples
        if n == 0:
            return []
        parts = [torch.randperm(n, generator=generator) for _ in range(wanted // n)]
        if wanted % n:  # (RandomSampler draws this last permutation even when it takes none of it)
            parts.append(torch.randperm(n, generator=generator)[: wanted % n])
        order = torch.cat(parts)
    elif type(sampler) is DistributedSampler:
        order = _distributed_order(sampler)
    if order is None:
        return None
    batches = list(order.split(batch_sampler.batch_size)) if order.numel() else []
    if batches and batch_sampler.drop_last and batches[-1].numel() < batch_sampler.batch_size:
        batches.pop()
    return batches


def _distributed_order(sampler: DistributedSampler) -> Tensor:
    """``DistributedSampler.__iter__``'s indices, as one tensor."""
    n = len(sampler.dataset)  # type: ignore[arg-type]
    if sampler.shuffle:
        indices = torch.randperm(n, generator=torch.Generator().manual_seed(sampler.seed + sampler.epoch))
    else:
        indices = torch.arange(n)
    if not sampler.drop_last:
        padding = sampler.total_size - n
        indices = torch.cat([indices, indices.repeat(-(-padding // n) if n else 0)[:padding]])
    else:
        indices = indices[: sampler.total_size]
    return indices[sampler.rank : sampler.total_size : sampler.num_replicas]


def _random_sampler(batch_sampler: Any) -> Any:
    """The sampler inside ``batch_sampler`` that draws from a ``generator``, if any."""
    sampler = getattr(batch_sampler, "sampler", None)
    return sampler if sampler is not None and hasattr(sampler, "generator") else None


def order_seed(sampler: Any) -> int:
    """The seed of a random sampler's epoch orders (NOTE [ Orders that resume ]); 0 without one."""
    if sampler is None:
        return 0
    if isinstance(sampler.generator, torch.Generator):
        return int(sampler.generator.initial_seed())
    return int(torch.empty((), dtype=torch.int64).random_().item())  # one draw, at wrapping time


def epoch_order_generator(order_seed: int, epoch: int) -> torch.Generator:
    """The generator the user's random sampler draws epoch ``epoch``'s order from."""
    return torch.Generator().manual_seed(_mix(order_seed, epoch))


def _mix(*values: int) -> int:
    out = 0
    for v in values:
        out = (out * 1_000_003 + v + 0x9E3779B9) % (2**63)
    return out
