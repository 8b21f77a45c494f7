"""The CI gate's thresholds, kept as data: what each one measures, which way it passes, which
budgets are valid. ``check`` measures, ``Gate.judge`` compares, the reporters (JUnit, Markdown)
print the outcomes; none of them knows a threshold by name."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .errors import VitcompressError


@dataclass(frozen=True)
class Threshold:
    """One kind of budget: ``metric`` (a key of the measured values) must stay on the right side."""
    metric: str
    label: str
    unit: str
    at_most: bool  # True: value <= budget passes; False: value >= budget passes
    low: float  # smallest valid budget (inclusive unless low_open)
    high: float  # largest valid budget (inclusive)
    low_open: bool = False
    why: str = ""

    def valid(self, budget: float) -> bool:
        if not math.isfinite(budget):
            return False
        above = budget > self.low if self.low_open else budget >= self.low
        return above and budget <= self.high

    def range_text(self) -> str:
        low = f"> {self.low:g}" if self.low_open else f">= {self.low:g}"
        return f"a number {low}" + ("" if math.isinf(self.high) else f" and <= {self.high:g}")


THRESHOLDS: dict[str, Threshold] = {
    "max_drop": Threshold("drop", "top-1 drop", "pp", True, 0.0, 100.0,
                          why="top-1 points the artifact may lose against its float baseline on the labelled images"),
    "min_agreement": Threshold("top1_agreement", "top-1 agreement", "%", False, 0.0, 100.0,
                               why="share of images where artifact and baseline predict the same class (needs no labels to mean something)"),
    "min_speedup": Threshold("speedup", "speedup", "x", False, 0.0, math.inf, low_open=True,
                             why="baseline latency / artifact latency, timed alternately in one process on this CPU and runtime"),
    "min_coverage": Threshold("int8_coverage", "int8 coverage", "% of MACs", False, 0.0, 100.0,
                              why="share of the model's multiply-adds that the runtime executes in integer kernels"),
    "max_size_ratio": Threshold("size_ratio", "size ratio", "x", True, 0.0, math.inf, low_open=True,
                                why="artifact bytes / baseline bytes (ONNX files, as deployed)"),
}


@dataclass(frozen=True)
class Gate:
    """The budgets a CI job sets; ``None`` leaves a threshold out (it is then neither measured nor judged)."""
    max_drop: float | None = None
    min_agreement: float | None = None
    min_speedup: float | None = None
    min_coverage: float | None = None
    max_size_ratio: float | None = None

    def budgets(self) -> dict[str, float]:
        """The thresholds that were set, in the order of THRESHOLDS."""
        return {name: float(v) for name, v in asdict(self).items() if v is not None}

    def problem(self) -> tuple[str, str] | None:
        """(threshold, what is wrong) for the first invalid budget, or None."""
        if not self.budgets():
            return "budget", "give at least one of " + ", ".join(option(n) for n in THRESHOLDS)
        for name, budget in self.budgets().items():
            t = THRESHOLDS[name]
            if not t.valid(budget):
                return name, f"must be {t.range_text()}, got {budget:g}"
        return None

    def validate(self) -> "Gate":
        """Self, or one line naming the bad budget (bad input, not a failed gate)."""
        problem = self.problem()
        if problem:
            name, what = problem
            raise VitcompressError(f"{option(name) if name in THRESHOLDS else name}: {what}")
        return self

    def measures(self, metric: str) -> bool:
        """Whether a set budget needs ``metric`` measured."""
        return any(THRESHOLDS[n].metric == metric for n in self.budgets())

    def judge(self, measured: dict[str, float]) -> list[dict]:
        """One outcome per set budget: the value, the budget, pass/fail and a sentence saying so."""
        outcomes = []
        for name, budget in self.budgets().items():
            t = THRESHOLDS[name]
            value = float(measured[t.metric])
            passed = value <= budget if t.at_most else value >= budget
            sign = ("<=" if passed else ">") if t.at_most else (">=" if passed else "<")
            outcomes.append({
                "threshold": name, "option": option(name), "metric": t.metric, "label": t.label, "unit": t.unit,
                "value": value, "budget": budget, "passed": bool(passed),
                "message": f"{t.label} {_fmt(value)} {t.unit} {sign} budget {_fmt(budget)} {t.unit} ({option(name)})",
            })
        return outcomes


GATE_FIELDS = tuple(f.name for f in fields(Gate))


def option(name: str) -> str:
    """The command-line spelling of a threshold."""
    return "--" + name.replace("_", "-")


def _fmt(v: float) -> str:
    return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.4g}"


def passed(outcomes: list[dict]) -> bool:
    return all(o["passed"] for o in outcomes)
