"""Recipes: measured ``SelectiveBatchLoader`` settings, with their own epoch budget.

``recipe(name, plain_epochs)`` returns the keyword arguments for ``SelectiveBatchLoader`` as a
dict, ``epochs`` included: the recipe's own epoch budget, which the training loop runs for and
spans its LR schedule over (same schedule shape as plain training, stretched or shrunk)::

    kwargs = sbdata.recipe("lossless", plain_epochs=8)
    sb = SelectiveBatchLoader(train_loader, model, **kwargs)
    for epoch in range(kwargs["epochs"]):
        for x, y in sb:
            losses = F.cross_entropy(model(x), y, reduction="none")
            sb.record(losses.detach())       # every batch of every epoch (NEEDS_RECORD)
            if sb.batch_weights is not None:  # reweighting recipes (NEEDS_WEIGHTS)
                losses = losses * sb.batch_weights
            losses.mean().backward()
            ...

NOTE [ Recipes rely on record() ]
Every recipe uses ``stale`` with a large ``n`` and starts with plain (full-data) warm-up
epochs. ``sb.record(losses)`` with the per-example training losses of every yielded batch,
warm-up epochs included, fills the loss cache, so the first selective epoch finds every loss
recent and runs no scoring pass (``SelectiveBatchLoader.mode``); from then on ``record()``
keeps the cache up to date and no scoring pass ever runs: a selective epoch costs about the
fraction of examples it trains on. Without ``record()`` the first selective epoch scores every
example once, and the cache then keeps those losses for the rest of training, so selection
degrades. :data:`NEEDS_RECORD` says so per recipe (all ``True``).

NOTE [ Reweighting recipes ]
"lossless" uses the InfoBatch-style policy: it keeps every example at or above the running
mean loss and a random ``keep`` of the rest, and up-weights those kept low-loss examples by
``1 / keep`` so the expected gradient of a batch is the full data's. The weights are in
``sb.batch_weights`` after each batch; a loop that ignores them trains on a biased sample.
:data:`NEEDS_WEIGHTS` says which recipes set them. ``sb.batch_weights`` is ``None`` for the
others, so the two lines above are safe in any loop.

The numbers below come from ``python -m sbdata.bench --out docs/bench`` (docs/benchmarks.md):
MNIST-1D, 60k examples, a 1-D CNN, plain training for 8 epochs, 3 seeds, on a 2-core CPU with
no GPU. Ratios are a recipe's training time (process CPU time) to a target over plain
training's time to the same target. The variants around them are in
``python -m sbdata.bench.sweep`` (docs/bench/sweep/sweep.md). Of the goals set for them,
"fast" meets its own (1.4x error in <= 0.4x) at the margin, 0.37-0.42x across seven runs;
"lossless" does not (0.70-0.74x against <= 0.6x).
"""

from __future__ import annotations

from typing import Any

__all__ = ["NEEDS_RECORD", "NEEDS_WEIGHTS", "RECIPES", "recipe"]

#: name -> (SelectiveBatchLoader kwargs without epochs, epoch budget as a multiple of plain's).
#: Ratios: time to the target over plain training's time to it, CPU-time clock, MNIST-1D,
#: ``python -m sbdata.bench --out docs/bench`` (docs/bench/results.md).
RECIPES: dict[str, tuple[dict[str, Any], float]] = {
    # "lossless": fastest to plain's final accuracy less 0.1 point. One plain warm-up epoch,
    # then InfoBatch-style selection from record()-refreshed losses over 1.5x plain's epochs:
    # every example at or above the running mean loss, plus a random 0.2 of those below it,
    # up-weighted 5x (NOTE [ Reweighting recipes ]): 99.22 % +- 0.08 against plain's 99.31 %,
    # the target at 0.72x plain's time to it (0.70-0.74x in three other runs), 1.4x plain's error at
    # 0.69x; 0.63x plain's total time, 55 % of its backprops. Random selection of as many
    # examples: 99.10 %, never lossless. The unbiased reweighting is what wins: rank selection
    # stalls just under the target unless whole batches are mixed in (interrupt), which costs
    # more (0.74-0.78x). Goal (<= 0.6x) NOT met.
    "lossless": (dict(keep=0.3, policy="infobatch", stale="once", start=0.04), 1.5),
    # "fast": fastest to 1.4x plain's final error. One plain warm-up epoch, then keep only
    # 0.12 of every source batch (Composer's rank draw over record()-refreshed losses, no
    # interrupt batches) for 1.5x plain's epochs: a selective epoch costs ~0.13 of a plain one,
    # so the whole run costs 0.33x plain's time (29 % of its backprops) and reaches 1.4x
    # plain's error at its 11th epoch: 0.41x (0.37-0.42x over seven runs), 99.08 % +- 0.07 at
    # the end. Random selection at the same cost: 98.83 %, never there. Tuned on
    # MNIST-1D; too few steps per epoch on a set as small as digits (1.3k images).
    "fast": (dict(keep=0.12, policy="rank", stale="once", start=0.04), 1.5),
    # "balanced": plain's own budget, one plain epoch first and one last, keep 0.5 with every
    # 4th batch plain: 99.23 % +- 0.02 for 0.79x plain's time and 72 % of its backprops; the
    # lossless target at 0.91x, 1.4x plain's error at 0.76x. Random selection: 99.19 %.
    "balanced": (dict(keep=0.5, policy="rank", stale="once", start=0.1, end=0.85, interrupt=4), 1.0),
}

#: Whether the training loop must call ``sb.record(per_example_losses)`` after every batch.
NEEDS_RECORD: dict[str, bool] = {"lossless": True, "fast": True, "balanced": True}

#: Whether the training loop must multiply the per-example losses by ``sb.batch_weights``.
NEEDS_WEIGHTS: dict[str, bool] = {"lossless": True, "fast": False, "balanced": False}


def recipe(name: str, plain_epochs: int) -> dict[str, Any]:
    """Keyword arguments for ``SelectiveBatchLoader`` that reproduce a measured recipe.

    Args:
        name: ``"lossless"`` (fastest to plain training's final accuracy less 0.1 point),
            ``"fast"`` (fastest to 1.4x plain training's final error) or ``"balanced"``
            (plain training's epoch budget at ~0.8x its time).
        plain_epochs: the epoch budget plain training would use.

    Returns:
        A new dict of keyword arguments, ``epochs`` included: the recipe's own budget
        (``round(factor * plain_epochs)``, at least 1); run the training loop, and its LR
        schedule, over that many epochs. The loop must call ``sb.record()`` (see
        :data:`NEEDS_RECORD`) and, for reweighting recipes, weigh the per-example losses by
        ``sb.batch_weights`` (see :data:`NEEDS_WEIGHTS`).

    Raises:
        ValueError: unknown ``name`` or ``plain_epochs`` not a positive int.
    """
    if name not in RECIPES:
        raise ValueError(f"name must be one of {sorted(RECIPES)}, got name={name!r}")
    if isinstance(plain_epochs, bool) or not isinstance(plain_epochs, int) or plain_epochs < 1:
        raise ValueError(f"plain_epochs must be a positive int, got plain_epochs={plain_epochs!r}")
    kwargs, factor = RECIPES[name]
    return {**kwargs, "epochs": max(1, round(factor * plain_epochs))}
