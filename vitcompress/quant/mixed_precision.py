"""Greedy mixed precision (MPTQ-ViT): per-layer bit-widths under a MAC-weighted average budget.

Every layer starts at the highest candidate width. Each step lowers, by one candidate, the layer
whose step costs the least sensitivity per bit saved, until the MAC-weighted average width is at
or below the target. Interpretations (see docs/mptq.md):
- A "layer" is one MAC-carrying product: a Linear/Conv2d (its weights and its input share the
  width) or, with --full, an attention product (both operands share the width).
- The average is weighted by MACs per image, so the budget tracks compute, not storage.
- The cost of a step is read from a table of isolated sensitivities (the layer alone at that width,
  every other layer at the highest width), measured once; the walked curve is then measured for
  real at every step by the caller's ``measure``.
- Discrete widths rarely land exactly on the target: the walk stops at the first assignment at or
  below it, then raises layers back (largest sensitivity saving per bit first) while the average
  stays at or below the target. The final average is therefore the largest reachable one that
  does not exceed the target: no single layer can be raised one step without breaking the budget.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

from ..errors import VitcompressError

Assignment = dict[str, int]


def average_bits(assignment: Mapping[str, int], macs: Mapping[str, int]) -> float:
    total = sum(macs[n] for n in assignment)
    return sum(macs[n] * b for n, b in assignment.items()) / total


def greedy_mixed_precision(
    macs: Mapping[str, int],
    choices: Sequence[int],
    target: float,
    sensitivity: Callable[[Assignment], float],
    measure: Callable[[Assignment], dict] | None = None,
    progress: Callable[[int, int], None] | None = None,
    sensitivities: Callable[[list[Assignment]], list[float]] | None = None,
) -> tuple[Assignment, list[dict], dict[str, dict[int, float]]]:
    """Walk from all-highest down to ``target`` average bits; returns the assignment, the path and
    the table of isolated sensitivities it walked on ({layer: {bits: sensitivity with that layer
    alone at those bits}}).

    ``sensitivity(assignment)`` scores an assignment (lower is better, e.g. KL of logits);
    ``measure(assignment)`` adds measured quantities to each path point (optional);
    ``sensitivities(assignments)`` scores the isolated probes all at once (e.g. on worker processes):
    the same numbers as ``sensitivity`` one by one.
    """
    choices = sorted(set(choices))
    if not macs or any(v <= 0 for v in macs.values()):
        raise VitcompressError("mixed precision needs layers with a positive MAC count")
    if not choices[0] <= target <= choices[-1]:
        raise VitcompressError(f"target {target} bits is outside the choices {choices}")
    names = list(macs)
    top = choices[-1]
    base = {n: top for n in names}
    s_base = sensitivity(base)
    table: dict[tuple[str, int], float] = {(n, top): s_base for n in names}
    lower = [(n, b) for n in names for b in choices[:-1]]
    if sensitivities is not None:
        table.update(zip(lower, sensitivities([{**base, n: b} for n, b in lower])))
        if progress:
            progress(len(lower), len(lower))
    for i, (n, b) in enumerate([] if sensitivities is not None else lower):
        table[(n, b)] = sensitivity({**base, n: b})
        if progress:
            progress(i + 1, len(lower))
    total_macs = sum(macs.values())

    def point(a: Assignment, step: str) -> dict:
        p = {"step": step, "average_bits": average_bits(a, macs),
             "estimated_sensitivity": sum(table[(n, b)] - s_base for n, b in a.items()) + s_base}
        if measure is not None:
            p.update(measure(a))
        return p

    current = dict(base)
    path = [point(current, "start")]
    while average_bits(current, macs) > target + 1e-12:
        best = None
        for n in names:
            i = choices.index(current[n])
            if i == 0:
                continue
            b = choices[i - 1]
            saved = macs[n] * (current[n] - b) / total_macs
            cost = table[(n, b)] - table[(n, current[n])]
            ratio = cost / saved
            if best is None or ratio < best[0]:
                best = (ratio, n, b)
        _, n, b = best
        current[n] = b
        path.append(point(current, f"lower {n} to {b}"))
    while True:  # raise back while the budget allows, most sensitivity saved per bit first
        best = None
        for n in names:
            i = choices.index(current[n])
            if i == len(choices) - 1:
                continue
            b = choices[i + 1]
            if average_bits({**current, n: b}, macs) > target + 1e-12:
                continue
            gain = (table[(n, current[n])] - table[(n, b)]) / (macs[n] * (b - current[n]))
            if best is None or gain > best[0]:
                best = (gain, n, b)
        if best is None:
            break
        _, n, b = best
        current[n] = b
        path.append(point(current, f"raise {n} to {b}"))
    isolated = {n: {b: table[(n, b)] for b in choices} for n in names}
    return current, path, isolated


def check_budget_tight(assignment: Mapping[str, int], macs: Mapping[str, int], choices: Sequence[int], target: float) -> bool:
    """True when the average is <= target and no single layer can go one step up within it."""
    choices = sorted(set(choices))
    if average_bits(assignment, macs) > target + 1e-12:
        return False
    for n, b in assignment.items():
        i = choices.index(b)
        if i + 1 < len(choices) and average_bits({**assignment, n: choices[i + 1]}, macs) <= target + 1e-12:
            return False
    return True
