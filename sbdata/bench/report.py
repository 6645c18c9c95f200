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
    "GOALS",
    "HEADLINE",
    "SEED_TARGETS",
    "goals",
    "goals_table",
    "per_seed",
    "per_seed_table",
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
    """Test accuracy against the training clock, one panel per dataset, one colour per method:
    the mean curve over seeds (thick) and each seed's own curve (thin, faint: the spread).

    ``studies``: dataset name -> ``{"methods": {name: {"seconds", "accuracy"}}, "summary": ...}``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("the benchmark plot needs matplotlib: pip install 'sbdata[bench]'") from e
    cols = min(3, len(studies))
    rows = -(-len(studies) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 5 * rows), squeeze=False)
    for ax in axes.flat[len(studies) :]:
        ax.axis("off")
    for ax, (dataset, study) in zip(axes.flat, studies.items()):
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
            if len(m["accuracy"]) > 1:  # each seed's own curve: the spread
                for seed_secs, seed_acc in zip(m["seconds"], m["accuracy"]):
                    ax.plot(seed_secs, seed_acc, color=style["color"], linewidth=0.6, alpha=0.35)
        for name, value in targets.items():
            ax.axhline(value, color="grey", linestyle=":", linewidth=0.8)
            ax.annotate(name, (0, value), fontsize=7, color="grey", va="bottom")
        top = max(max(mean_curve(m["seconds"], m["accuracy"])[1]) for m in study["methods"].values())
        ax.set_ylim(max(lowest, 0.0), min(100.0, top + 0.25 * (top - lowest)) if math.isfinite(top) else 100.0)
        ax.set_xlabel("training CPU time, s (evaluation excluded)")
        ax.set_ylabel("test accuracy, % (thick: mean over seeds; thin: each seed)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


#####  Per seed (NOTE [ Per-seed targets ])  #####

# NOTE [ Per-seed targets ]
# The suite also reads every seed on its own: seed s of a method is compared with seed s of
# plain training (same weights' initialisation, same data order at the start). Its targets come
# from plain's final accuracy A_s in that seed: "lossless" is A_s - 0.1 point, "err x1.4" is an
# error of 1.4 (100 - A_s). A method's time to a target is the first epoch end at which that
# seed's accuracy reaches it, and its ratio is that over plain's own time to the same target in
# the same seed, on each clock (process CPU time, the headline, and wall-clock).

#: The targets read per seed.
SEED_TARGETS: tuple[str, ...] = ("lossless", "err x1.4")


def per_seed(
    methods: dict[str, dict[str, Any]], seeds: Sequence[int], plain: str = "plain"
) -> dict[str, Any]:
    """Each method's result in each seed, against plain training in the same seed.

    Args:
        methods: name -> ``{"cpu_seconds": [[per epoch] per seed], "seconds": [...] (wall),
            "accuracy": [...]}``, seeds in the order of ``seeds``.
        seeds: the seeds, in the order the curves are listed.

    Returns:
        ``{"targets": {seed: {target: %}}, "methods": {name: [{"seed", "final", "delta",
        "cpu_seconds", "wall_seconds", "time_ratio", "cpu_to": {target: s or None}, "cpu_ratio":
        {target: x or None}, "wall_ratio": {target: x or None}} per seed]}}``; ``delta`` is
        the final accuracy less plain's in the same seed.
    """
    if plain not in methods:
        raise ValueError(f"the baseline {plain!r} is not among the methods {sorted(methods)}")
    base_m = methods[plain]
    out: dict[str, Any] = {"targets": {}, "methods": {name: [] for name in methods}}
    for k, seed in enumerate(seeds):
        plain_final = base_m["accuracy"][k][-1]
        targets = {t: v for t, v in targets_from(plain_final).items() if t in SEED_TARGETS}
        out["targets"][seed] = targets
        base = {
            clock: {t: time_to_target(base_m[clock][k], base_m["accuracy"][k], v) for t, v in targets.items()}
            for clock in ("cpu_seconds", "seconds")
        }
        for name, m in methods.items():
            acc = m["accuracy"][k]
            reached = {
                clock: {t: time_to_target(m[clock][k], acc, v) for t, v in targets.items()}
                for clock in ("cpu_seconds", "seconds")
            }
            out["methods"][name].append(
                {
                    "seed": seed,
                    "final": acc[-1],
                    "delta": acc[-1] - plain_final,
                    "cpu_seconds": m["cpu_seconds"][k][-1],
                    "wall_seconds": m["seconds"][k][-1],
                    "time_ratio": _ratio(m["cpu_seconds"][k][-1], base_m["cpu_seconds"][k][-1]),
                    "cpu_to": reached["cpu_seconds"],
                    "cpu_ratio": {t: _ratio(reached["cpu_seconds"][t], base["cpu_seconds"][t]) for t in targets},
                    "wall_ratio": {t: _ratio(reached["seconds"][t], base["seconds"][t]) for t in targets},
                }
            )
    return out


def per_seed_table(seeds_summary: dict[str, Any], epochs: dict[str, int] | None = None) -> str:
    """One row per method and seed: final accuracy (and its difference to plain's in the same
    seed), training time, and the time to each per-seed target as a ratio to plain's, CPU time
    with the wall-clock ratio in brackets."""
    head = ["method", "seed", "epochs", "final acc. % (vs plain)", "train CPU s (× plain)", "wall s"]
    head += ["to plain − 0.1 pt: CPU × (wall ×)", "to 1.4x plain's error: CPU × (wall ×)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in seeds_summary["methods"].items():
        for row in rows:
            ratio = f" ({row['time_ratio']:.2f}x)" if row["time_ratio"] is not None else ""
            cells = [
                name,
                str(row["seed"]),
                str(epochs[name]) if epochs and name in epochs else "",
                f"{row['final']:.2f} ({row['delta']:+.2f})",
                f"{row['cpu_seconds']:.1f}{ratio}",
                f"{row['wall_seconds']:.1f}",
            ]
            for t in SEED_TARGETS:
                cpu = row["cpu_ratio"][t]
                cells.append(_cell(cpu) + ("" if cpu is None else f" ({_cell(row['wall_ratio'][t])})"))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#####  The goals, per dataset and seed  #####

# NOTE [ Goals ]
# Read per seed (NOTE [ Per-seed targets ]), on the CPU-time clock. "Beats X" means reaching
# the method's own target strictly sooner than X does (X not reaching it at all counts as
# later); "no later than" allows a tie.
#   lossless-acc: recipe:lossless ends at or above plain's final accuracy - 0.1 point;
#   lossless-0.6x: and it reaches that target in <= 0.6x plain's time;
#   fast-0.4x: recipe:fast reaches 1.4x plain's final error in <= 0.4x plain's time;
#   lossless/fast-beat-infobatch-peer, -beat-random: each recipe beats the InfoBatch peer and its
#       cost-matched random twin to its own target;
#   sb-default-vs-plain-half, -vs-rs2: the default keep=0.5 loop without record() reaches 1.4x
#       plain's error no later than plain-half and RS2.

#: goal -> (method, target, kind, reference): kind "acc" (final >= target), "ratio" (ratio <=
#: the number in reference), "beats" (strictly sooner than reference), "no-later" (<= reference).
GOALS: dict[str, tuple[str, str, str, Any]] = {
    "lossless-acc": ("recipe:lossless", "lossless", "acc", None),
    "lossless-0.6x": ("recipe:lossless", "lossless", "ratio", 0.6),
    "lossless-beats-infobatch-peer": ("recipe:lossless", "lossless", "beats", "infobatch-peer"),
    "lossless-beats-random": ("recipe:lossless", "lossless", "beats", "random@lossless"),
    "fast-0.4x": ("recipe:fast", "err x1.4", "ratio", 0.4),
    "fast-beats-infobatch-peer": ("recipe:fast", "err x1.4", "beats", "infobatch-peer"),
    "fast-beats-random": ("recipe:fast", "err x1.4", "beats", "random@fast"),
    "sb-default-vs-plain-half": ("sb-default", "err x1.4", "no-later", "plain-half"),
    "sb-default-vs-rs2": ("sb-default", "err x1.4", "no-later", "rs2"),
}


def _later(x: float | None) -> float:
    return math.inf if x is None else x


def goals(seeds_summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Every goal of :data:`GOALS` whose methods ran, in every seed: ``{"goal", "seed", "holds",
    "value", "reference"}`` (value: the method's final accuracy or CPU-time ratio; reference:
    the target accuracy, the ratio bound or the other method's ratio). NOTE [ Goals ]."""
    rows = seeds_summary["methods"]
    out = []
    for goal, (name, target, kind, ref) in GOALS.items():
        if name not in rows or (isinstance(ref, str) and ref not in rows):
            continue
        for k, row in enumerate(rows[name]):
            seed = row["seed"]
            ratio = row["cpu_ratio"][target]
            if kind == "acc":
                value, reference = row["final"], seeds_summary["targets"][seed][target]
                holds = value >= reference - 1e-9
            elif kind == "ratio":
                value, reference = ratio, ref
                holds = ratio is not None and ratio <= ref + 1e-9
            else:
                value, reference = ratio, rows[ref][k]["cpu_ratio"][target]
                if kind == "beats":
                    holds = ratio is not None and _later(ratio) < _later(reference)
                else:
                    holds = ratio is not None and _later(ratio) <= _later(reference) + 1e-9
            out.append({"goal": goal, "seed": seed, "holds": bool(holds), "value": value, "reference": reference})
    return out


def goals_table(per_dataset: dict[str, list[dict[str, Any]]]) -> str:
    """Goals down, datasets across; each cell lists the seeds: ``held`` or ``MISSED``, with
    the value against its reference."""
    datasets = list(per_dataset)
    names = list(dict.fromkeys(g["goal"] for rows in per_dataset.values() for g in rows))
    lines = ["| goal | " + " | ".join(datasets) + " |", "|" + "---|" * (1 + len(datasets))]

    def fmt(v: Any, goal: str, other: Any = None) -> str:
        if v is None:
            return "not reached"
        digits = 2
        while isinstance(other, (int, float)) and digits < 5 and f"{v:.{digits}f}" == f"{other:.{digits}f}" and v != other:
            digits += 1  # a miss or a win that two decimals would hide
        return f"{v:.{digits}f} %" if GOALS[goal][2] == "acc" else f"{v:.{digits}f}x"

    for goal in names:
        cells = [goal]
        for d in datasets:
            parts = [
                f"s{g['seed']}: {'held' if g['holds'] else '**MISSED**'} "
                f"({fmt(g['value'], goal, g['reference'])} vs {fmt(g['reference'], goal, g['value'])})"
                for g in per_dataset[d]
                if g["goal"] == goal
            ]
            cells.append("<br>".join(parts) if parts else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
