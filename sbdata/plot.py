"""A picture of what the selection did: ``selection_report(sb)`` (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["selection_report"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("sbdata.plot needs matplotlib: pip install 'sbdata[bench]'") from e
    return plt


def selection_report(sb: Any, path: str | Path | None = None, *, epoch: int | None = None) -> Any:
    """Draw four panels about a :class:`~sbdata.SelectiveBatchLoader`'s selection so far.

    1. Loss distribution of selected and skipped examples (``epoch``, default the last
       selective epoch).
    2. Per-example selection frequency: how often each example was kept when it was a
       candidate (needs example ids: stale mode or ``index_key``).
    3. Kept fraction per epoch.
    4. Scoring time and examples whose loading was skipped, per epoch.

    Returns the matplotlib ``Figure``; saves it to ``path`` if given.
    """
    plt = _pyplot()
    log, history = sb.selection_log, sb.stats.history
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    _loss_panel(axes[0][0], log, epoch)
    _frequency_panel(axes[0][1], log)
    epochs = [s.epoch for s in history]
    ax = axes[1][0]
    ax.plot(epochs, [s.kept_fraction for s in history], marker="o")
    ax.set(title="kept fraction per epoch", xlabel="epoch", ylabel="selected / candidates", ylim=(0, 1.05))
    ax = axes[1][1]
    ax.bar(epochs, [s.scoring_seconds for s in history], color="tab:orange", label="scoring seconds")
    ax.set(title="scoring time and skipped loads", xlabel="epoch", ylabel="seconds")
    twin = ax.twinx()
    twin.plot(epochs, [s.loads_skipped for s in history], color="tab:green", marker="s", label="loads skipped")
    twin.set_ylabel("examples not loaded")
    ax.legend(loc="upper left", fontsize="small")
    twin.legend(loc="upper right", fontsize="small")
    fig.suptitle(f"sbdata selection report ({type(sb.policy).__name__}, keep={sb.keep})")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _loss_panel(ax: Any, log: Any, epoch: int | None) -> None:
    if not log.samples:
        ax.set_title("no selective epoch yet")
        return
    epoch = max(log.samples) if epoch is None else epoch
    losses, chosen, _ = log.samples[epoch]
    bins = torch.linspace(float(losses.min()), float(losses.max()) + 1e-6, 40).numpy()
    ax.hist(losses[~chosen].numpy(), bins=bins, alpha=0.6, label="skipped")
    ax.hist(losses[chosen].numpy(), bins=bins, alpha=0.6, label="selected")
    ax.set(title=f"losses in epoch {epoch}", xlabel="loss", ylabel="examples")
    ax.legend()


def _frequency_panel(ax: Any, log: Any) -> None:
    freq = log.selection_frequency()
    if freq.numel() == 0:
        ax.set_title("selection frequency (needs example ids)")
        return
    ax.hist(freq.numpy(), bins=20, range=(0, 1), color="tab:purple")
    ax.set(title="how often each example was kept", xlabel="kept / times a candidate", ylabel="examples")
