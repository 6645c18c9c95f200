"""Recipes: measured ``SelectiveBatchLoader`` settings, with their own epoch budget.

``recipe(name, plain_epochs)`` returns the keyword arguments for ``SelectiveBatchLoader`` as a
dict, ``epochs`` included: the recipe's own epoch budget, which the training loop runs for and
spans its LR schedule over (``OneCycleLR(..., total_steps=sb.total_steps())`` ends exactly at
the last batch)::

    kwargs = sbdata.recipe("lossless", plain_epochs=8)
    sb = SelectiveBatchLoader(train_loader, model, **kwargs)
    for epoch in range(kwargs["epochs"]):
        for x, y in sb:
            losses = F.cross_entropy(model(x), y, reduction="none")
            loss = sb.record(losses).mean()  # every batch of every epoch (NEEDS_RECORD)
            loss.backward()
            ...

NOTE [ Recipes rely on record() ]
Every recipe uses ``stale="once"`` and starts with plain (full-data) warm-up epochs.
``sb.record(losses)`` with the per-example training losses of every yielded batch, warm-up
epochs included, fills the loss cache, so the first selective epoch finds every loss measured
and runs no scoring pass; from then on ``record()`` keeps the cache up to date and no scoring
pass ever runs: a selective epoch costs about the fraction of examples it trains on. Without
``record()`` the first selective epoch scores every example once and the cache then keeps those
losses for the rest of training, so selection degrades. :data:`NEEDS_RECORD` says so per recipe.

NOTE [ Reweighting recipes ]
"lossless" uses the InfoBatch-style policy: of each batch it keeps the examples at or above the
running mean loss and fills the rest of its ``keep`` with a random draw from the others,
up-weighted by the inverse of their chance of being drawn, so the expected gradient of a batch
is the full data's. ``sb.record(losses)`` returns the losses times those weights; a loop that
ignores them trains on a biased sample. :data:`NEEDS_WEIGHTS` says which recipes reweight.

The settings were chosen with ``python -m sbdata.bench.suite_sweep`` on the benchmark suite
(``python -m sbdata.bench --full``: MNIST-1D, the 8x8 digits and real 28x28 MNIST); what they
achieve, per data set and seed, and which goals they miss, is in docs/benchmarks.md (not
repeated here, where it would go stale).
"""

from __future__ import annotations

from typing import Any

__all__ = ["NEEDS_RECORD", "NEEDS_WEIGHTS", "RECIPES", "recipe"]

#: name -> (SelectiveBatchLoader kwargs without epochs, epoch budget as a multiple of plain's).
RECIPES: dict[str, tuple[dict[str, Any], float]] = {
    # "lossless": plain training's final accuracy less 0.1 point; InfoBatch-style reweighted
    # pruning with a final full-data phase (end), over a longer budget than plain's.
    "lossless": (dict(keep=0.4, policy="infobatch", stale="once", start=0.04, end=0.875), 1.25),
    # "fast": fastest to 1.4x plain training's final error; a final full-data phase (end).
    "fast": (dict(keep=0.2, policy="rank", stale="once", start=0.04, end=0.9), 1.0),
    # "balanced": plain training's epoch budget at less of its time.
    "balanced": (dict(keep=0.5, policy="rank", stale="once", start=0.1, end=0.85, interrupt=4), 1.0),
}

#: Whether the training loop must call ``sb.record(per_example_losses)`` after every batch.
NEEDS_RECORD: dict[str, bool] = {"lossless": True, "fast": True, "balanced": True}

#: Whether the recipe reweights examples: the loop must use the losses ``sb.record()`` returns.
NEEDS_WEIGHTS: dict[str, bool] = {"lossless": True, "fast": False, "balanced": False}


def recipe(name: str, plain_epochs: int) -> dict[str, Any]:
    """Keyword arguments for ``SelectiveBatchLoader`` that reproduce a measured recipe.

    Args:
        name: ``"lossless"`` (fastest to plain training's final accuracy less 0.1 point),
            ``"fast"`` (fastest to 1.4x plain training's final error) or ``"balanced"``
            (plain training's epoch budget at less of its time).
        plain_epochs: the epoch budget plain training would use.

    Returns:
        A new dict of keyword arguments, ``epochs`` included: the recipe's own budget
        (``round(factor * plain_epochs)``, at least 1); run the training loop, and its LR
        schedule, over that many epochs. The loop must call ``sb.record()`` (see
        :data:`NEEDS_RECORD`) and, for reweighting recipes, train on the weighted losses it
        returns (see :data:`NEEDS_WEIGHTS`).

    Raises:
        ValueError: unknown ``name`` or ``plain_epochs`` not a positive int.
    """
    if name not in RECIPES:
        raise ValueError(f"name must be one of {sorted(RECIPES)}, got name={name!r}")
    if isinstance(plain_epochs, bool) or not isinstance(plain_epochs, int) or plain_epochs < 1:
        raise ValueError(f"plain_epochs must be a positive int, got plain_epochs={plain_epochs!r}")
    kwargs, factor = RECIPES[name]
    return {**kwargs, "epochs": max(1, round(factor * plain_epochs))}
