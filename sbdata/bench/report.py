"""Metrics, the markdown table and the plot of the time-to-accuracy study.

The metrics are pure functions of accuracy-against-time curves, so they can be tested on
synthetic curves with known answers (``tests/test_bench.py``).

NOTE [ Time to target ]
Every method runs the same number of epochs for every seed, so its curves line up epoch by
epoch. The *mean curve* averages, per epoch, the test accuracy and the training clock over the
seeds. A method's time to a target is the first mean-curve time at which the mean accuracy
reaches the target (quantised to whole epochs: accuracy is measured after each epoch), and
``None`` ("not reached") if it never does. Targets come from plain training's mean final
accuracy ``A`` (error ``100 - A``): "lossless" is ``A - 0.1`` points, and ``err x k`` is an
error of ``k * (100 - A)``. Each time is reported as a ratio to plain training's own time to
the same target on its mean curve, measured in the same run. :data:`HEADLINE` names the two
targets the recipes aim at; :func:`headline_table` shows only those.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = [
    "HEADLINE",
    "TARGETS",
    "headline_table",
    "markdown_table",
    "mean_curve",
    "plot",
    "summarize",
    "targets_from",
    "time_to_target",
]

#: target name -> (kind, value): ("drop", d) is A - d points; ("error", k) is k times plain's error.
TARGETS: dict[str, tuple[str, float]] = {
    "lossless": ("drop", 0.1),
    "err x1.1": ("error", 1.1),
    "err x1.2": ("error", 1.2),
    "err x1.4": ("error", 1.4),
}


#: The targets of the recipes: "lossless" for ``recipe:lossless``, "err x1.4" for ``recipe:fast``.
HEADLINE: tuple[str, ...] = ("lossless", "err x1.4")


def targets_from(plain_final: float) -> dict[str, float]:
    """Accuracy targets (percent) derived from plain training's mean final accuracy."""
    out = {}
    for name, (kind, value) in TARGETS.items():
        out[name] = plain_final - value if kind == "drop" else 100.0 - value * (100.0 - plain_final)
    return out


def mean_curve(seconds: Sequence[Sequence[float]], accuracy: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    """Per-epoch means over seeds of the clock and the accuracy; curves must be equally long."""
    lengths = {len(s) for s in seconds} | {len(a) for a in accuracy}
    if len(lengths) != 1:
        raise ValueError(f"every seed's curve must have the same number of epochs, got lengths {sorted(lengths)}")
    return [statistics.fmean(col) for col in zip(*seconds)], [statistics.fmean(col) for col in zip(*accuracy)]


def time_to_target(seconds: Sequence[float], accuracy: Sequence[float], target: float) -> float | None:
    """First time at which ``accuracy`` reaches ``target`` (``>=``), or ``None`` if never."""
    for t, a in zip(seconds, accuracy):
        if a >= target - 1e-9:
            return t
    return None


def _ratio(t: float | None, base: float | None) -> float | None:
    if t is None or base is None or base <= 0:
        return None
    return t / base


def summarize(methods: dict[str, dict[str, Any]], plain: str = "plain") -> dict[str, Any]:
    """Final accuracy, time to every target and its ratio to ``plain``'s, for each method.

    Args:
        methods: name -> ``{"seconds": [[per epoch] per seed], "accuracy": [[...] per seed], ...}``.
        plain: the name of the baseline method in ``methods``.

    Returns:
        ``{"targets": {...}, "methods": {name: {"final_mean", "final_std", "train_seconds",
        "time_ratio", "time_to": {target: s or None}, "ratio": {target: x or None}}}}``.
    """
    if plain not in methods:
        raise ValueError(f"the baseline {plain!r} is not among the methods {sorted(methods)}")
    curves = {name: mean_curve(m["seconds"], m["accuracy"]) for name, m in methods.items()}
    finals = {name: [acc[-1] for acc in m["accuracy"]] for name, m in methods.items()}
    targets = targets_from(statistics.fmean(finals[plain]))
    base = {k: time_to_target(*curves[plain], v) for k, v in targets.items()}
    out: dict[str, Any] = {"targets": targets, "methods": {}}
    for name, (secs, acc) in curves.items():
        reached = {k: time_to_target(secs, acc, v) for k, v in targets.items()}
        out["methods"][name] = {
            "final_mean": statistics.fmean(finals[name]),
            "final_std": statistics.stdev(finals[name]) if len(finals[name]) > 1 else 0.0,
            "train_seconds": secs[-1],
            "time_ratio": _ratio(secs[-1], curves[plain][0][-1]),
            "time_to": reached,
            "ratio": {k: _ratio(reached[k], base[k]) for k in targets},
        }
    return out


def _cell(ratio: float | None) -> str:
    return "not reached" if ratio is None else f"{ratio:.2f}x"


def markdown_table(summary: dict[str, Any], epochs: dict[str, int] | None = None) -> str:
    """One row per method: final accuracy, training time and the time-to-target ratios."""
    names = list(TARGETS)
    head = "| method | epochs | final acc. % (mean ± std) | train time s (× plain) | " + " | ".join(
        f"{n} ({summary['targets'][n]:.2f} %)" for n in names
    ) + " |"
    lines = [head, "|" + "---|" * (4 + len(names))]
    for name, m in summary["methods"].items():
        ep = str(epochs[name]) if epochs and name in epochs else ""
        cells = [
            name,
            ep,
            f"{m['final_mean']:.2f} ± {m['final_std']:.2f}",
            f"{m['train_seconds']:.1f} ({m['time_ratio']:.2f}x)" if m["time_ratio"] is not None else f"{m['train_seconds']:.1f}",
        ] + [_cell(m["ratio"][n]) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline_table(
    summary: dict[str, Any], summary_wall: dict[str, Any] | None = None, epochs: dict[str, int] | None = None
) -> str:
    """The first look's table: one row per method with its final accuracy, training time and
    its time to each :data:`HEADLINE` target as a ratio to plain's, on ``summary``'s clock
    (the CPU time), with ``summary_wall``'s (the wall-clock) in brackets if given."""
    head = ["method", "epochs", "final acc. %", "train time s (× plain)"]
    head += [f"to {n} ({summary['targets'][n]:.2f} %), × plain" for n in HEADLINE]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in summary["methods"].items():
        acc = f"{m['final_mean']:.2f}" + (f" ± {m['final_std']:.2f}" if m["final_std"] else "")
        spent = f"{m['train_seconds']:.1f}" + (f" ({m['time_ratio']:.2f}x)" if m["time_ratio"] is not None else "")
        cells = [name, str(epochs[name]) if epochs and name in epochs else "", acc, spent]
        for target in HEADLINE:
            cell = _cell(m["ratio"][target])
            if summary_wall is not None and m["ratio"][target] is not None:
                cell += f" (wall {_cell(summary_wall['methods'][name]['ratio'][target])})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(studies: dict[str, dict[str, Any]], path: str) -> None:
    """Mean test accuracy against the training clock, one panel per dataset, one curve per method.

    ``studies``: dataset name -> ``{"methods": {name: {"seconds", "accuracy"}}, "summary": ...}``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the benchmark plot needs matplotlib: pip install 'sbdata[bench]'") from e
    fig, axes = plt.subplots(1, len(studies), figsize=(7 * len(studies), 5), squeeze=False)
    for ax, (dataset, study) in zip(axes[0], studies.items()):
        targets = study["summary"]["targets"]
        lowest = targets["err x1.4"] - 2.0 * (targets["lossless"] - targets["err x1.4"] + 0.1)
        colors = plt.get_cmap("tab20").colors  # type: ignore[attr-defined]
        for i, (name, m) in enumerate(study["methods"].items()):
            secs, acc = mean_curve(m["seconds"], m["accuracy"])
            style: dict[str, Any] = {"color": colors[(2 * i) % 20 + (2 * i) // 20], "linewidth": 1.2}
            if name.startswith("plain"):
                style = {"color": "black", "linewidth": 2.5 if name == "plain" else 1.5}
            if name.startswith("recipe"):
                style["linewidth"] = 2.5
            if name.startswith("random") or name == "plain-half":
                style["linestyle"] = "--"
            ax.plot(secs, acc, marker=".", label=name, **style)
        for name, value in targets.items():
            ax.axhline(value, color="grey", linestyle=":", linewidth=0.8)
            ax.annotate(name, (0, value), fontsize=7, color="grey", va="bottom")
        top = max(max(mean_curve(m["seconds"], m["accuracy"])[1]) for m in study["methods"].values())
        ax.set_ylim(max(lowest, 0.0), min(100.0, top + 0.25 * (top - lowest)) if math.isfinite(top) else 100.0)
        ax.set_xlabel("training time, s (mean over seeds; evaluation excluded)")
        ax.set_ylabel("test accuracy, % (mean over seeds)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
