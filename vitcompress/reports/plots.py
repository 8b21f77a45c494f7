"""Figures of a report, as PNG bytes (matplotlib, Agg backend): drawn from measured report fields only."""
from __future__ import annotations

import io
from typing import Sequence

_COLOURS = {"float": "#7f7f7f", "compressed": "#1f77b4", "other": "#ff7f0e"}
_BIT_COLOURS = {2: "#d62728", 3: "#e377c2", 4: "#ff7f0e", 5: "#bcbd22", 6: "#2ca02c", 7: "#17becf", 8: "#1f77b4"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    """PNG bytes with no creation metadata, so the same report draws the same bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    _pyplot().close(fig)
    return buf.getvalue()


def bars(values: dict[str, float], ylabel: str, title: str, errors: dict[str, tuple[float, float]] | None = None,
         fmt: str = "{:.2f}") -> bytes:
    """One bar per entry (the first is the float reference, grey), each labelled with its value;
    ``errors`` gives (low, high) whiskers, e.g. min and max of a latency."""
    plt = _pyplot()
    names = list(values)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.2))
    colours = [_COLOURS["float"]] + [_COLOURS["compressed"]] * (len(names) - 1)
    yerr = None
    if errors:
        yerr = [[values[n] - errors[n][0] for n in names], [errors[n][1] - values[n] for n in names]]
    ax.bar(names, [values[n] for n in names], color=colours, yerr=yerr, capsize=4)
    for i, n in enumerate(names):
        ax.annotate(fmt.format(values[n]), (i, values[n]), ha="center", va="bottom", xytext=(0, 2), textcoords="offset points", fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def layer_bits(assignment: dict[str, int], macs: dict[str, float] | None, title: str) -> bytes:
    """Chosen bits per layer (bar height), coloured by width; MACs per layer as a line on a second axis."""
    plt = _pyplot()
    names = list(assignment)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(names) + 2), 3.6))
    ax.bar(range(len(names)), [assignment[n] for n in names], color=[_BIT_COLOURS.get(int(assignment[n]), "#333333") for n in names])
    ax.set_ylabel("bits")
    ax.set_ylim(0, 9)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    if macs:
        ax2 = ax.twinx()
        ax2.plot(range(len(names)), [macs.get(n, 0) / 1e6 for n in names], "k.-", lw=0.8, ms=3)
        ax2.set_ylabel("MMACs per image")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def pareto(path: Sequence[dict], target_bits: float, title: str) -> bytes:
    """The greedy mixed-precision walk: average bits vs measured KL (and its additive estimate), and vs top-1 agreement."""
    plt = _pyplot()
    bits = [p["average_bits"] for p in path]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(bits, [p["kl"] for p in path], "o-", ms=3, label="measured KL")
    ax1.plot(bits, [p["estimated_sensitivity"] for p in path], "--", label="additive estimate")
    ax1.set_xlabel("MAC-weighted average bits")
    ax1.set_ylabel("KL(float || quantized logits)")
    ax1.set_yscale("log")
    ax1.legend()
    ax2.plot(bits, [p["top1_agreement"] for p in path], "o-", ms=3, color="C2")
    ax2.set_xlabel("MAC-weighted average bits")
    ax2.set_ylabel("top-1 agreement with float, %")
    for ax in (ax1, ax2):
        ax.invert_xaxis()
        ax.axvline(target_bits, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title} (calibration images)")
    fig.tight_layout()
    return _png(fig)


def series(points: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str, log: bool = False,
           mark: int | None = None) -> bytes:
    """One line per named series over its index (e.g. the calibration KL per search round); ``mark`` rings one index."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, ys in points.items():
        ax.plot(range(len(ys)), list(ys), "o-", ms=4, label=name)
        if mark is not None and 0 <= mark < len(ys):
            ax.plot([mark], [ys[mark]], "o", ms=11, mfc="none", mec="k")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def search_trace(trace: Sequence[dict], title: str) -> bytes:
    """A width search over its steps: task loss (left), expected MACs reduction and entropy (right)."""
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    steps = [t["step"] for t in trace]
    ax.plot(steps, [t["task"] for t in trace], color=_COLOURS["compressed"])
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss")
    ax.grid(alpha=0.3)
    ax2.plot(steps, [t["macs_factor"] for t in trace], color="k", label="expected MACs reduction")
    ax2.set_xlabel("step")
    ax2.set_ylabel("MACs reduction")
    twin = ax2.twinx()
    twin.plot(steps, [t["entropy"] for t in trace], color="#d62728", ls="--", label="mean entropy")
    twin.set_ylabel("entropy (nats)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def speed_search(iterations: Sequence[dict], target: float | None, title: str) -> bytes:
    """prune's measured-speed search: each tried MACs reduction and the speedup measured for it."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = [it["macs_factor"] for it in iterations]
    ys = [it["measured_speedup"] for it in iterations]
    ok = [bool(it.get("meets_target")) for it in iterations]
    ax.plot(xs, ys, ":", color="grey", lw=0.8)
    ax.scatter(xs, ys, c=["#2ca02c" if o else "#d62728" for o in ok], zorder=3)
    for it, x, y in zip(iterations, xs, ys):
        ax.annotate(str(it["iteration"]), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8)
    if target:
        ax.axhline(target, color="k", lw=0.8, ls="--", label=f"target {target:g}x")
        ax.legend(fontsize=8)
    ax.set_xlabel("MACs reduction (dense / pruned)")
    ax.set_ylabel("measured speedup vs float")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def kept_units(layout: dict[str, int], dense: dict[str, int], title: str) -> bytes:
    """Units kept per prunable group after pruning, as a share of the dense model's."""
    plt = _pyplot()
    names = list(dense)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 3.6))
    ax.bar(range(len(names)), [100.0 * layout.get(n, 0) / dense[n] for n in names], color=_COLOURS["compressed"])
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("units kept, % of dense")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def sensitivity_map(isolated: dict[str, dict], chosen: dict[str, int], title: str) -> bytes:
    """Isolated sensitivity per layer and width (the layer alone at that width), log colour scale;
    the width each layer got is boxed."""
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    names = list(isolated)
    widths = sorted({int(b) for v in isolated.values() for b in v})
    grid = np.array([[float(isolated[n].get(b, isolated[n].get(str(b), np.nan))) for n in names] for b in widths])
    positive = grid[np.isfinite(grid) & (grid > 0)]
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(names) + 2), 0.5 * len(widths) + 2.4))
    im = ax.imshow(np.where(grid > 0, grid, np.nan), aspect="auto", cmap="viridis", norm=norm)
    for i, n in enumerate(names):
        if n in chosen and int(chosen[n]) in widths:
            ax.add_patch(plt.Rectangle((i - 0.5, widths.index(int(chosen[n])) - 0.5), 1, 1, fill=False, ec="red", lw=1.2))
    ax.set_yticks(range(len(widths)), [f"{b} bits" for b in widths])
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    fig.colorbar(im, ax=ax, label="sensitivity (KL)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)
