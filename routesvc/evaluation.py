"""Routing quality: how much of the strong model's quality a router keeps for its cost.

A router gives each prompt a score (higher = prefers the strong model). Sending the top ``k``
prompts to the strong model and the rest to the weak one, for every ``k``, traces the
*routing curve*: share of strong calls against mean quality (and against cost when
``cost_usd`` is known). Prompts with equal scores move together, and between two such steps
the curve is a straight line: the expected result of breaking the tie at random.

- **PGR** (performance gap recovered, RouteLLM) at a point = (quality - weak) / (strong - weak).
- **APGR** = the area under PGR against the share of strong calls, on [0, 1]: RouteLLM's
  ``apgr_metric`` in the limit of a threshold at every score (random = 0.5 in expectation).
- **CPT(x%)** = the smallest share of strong calls at which PGR first reaches x% (RouteLLM's
  "calls to strong model needed for x% quality"), linearly interpolated.
- **AIQ** (RouterBench) = the area under the non-decreasing upper convex hull of the
  (cost, quality) points, divided by the cost range; needs per-prompt ``cost_usd``.
- **Savings at 95%** = the cost of always-strong minus the cost at the first point whose quality
  reaches 95% of always-strong quality.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from routesvc.errors import RouteSvcError
from routesvc.fitting import find_model
from routesvc.outcomes import OutcomeRecord

FloatArray = npt.NDArray[np.float64]


class EvaluationError(RouteSvcError):
    """The data cannot be evaluated for this pair (no prompt has both models, lengths differ)."""

    reason = "INVALID_EVALUATION"


@dataclass(frozen=True, slots=True)
class RoutingCurve:
    """The routing curve at each tie-group boundary: strong share, mean quality, mean cost."""

    share: FloatArray
    quality: FloatArray
    cost: FloatArray | None
    strong_quality: float
    weak_quality: float

    def pgr(self) -> FloatArray:
        """Performance gap recovered at each point (0 when both models score the same)."""
        gap = self.strong_quality - self.weak_quality
        if abs(gap) < 1e-12:
            return np.zeros_like(self.quality)
        return (self.quality - self.weak_quality) / gap


@dataclass(frozen=True, slots=True)
class RoutingReport:
    """Every metric of one router on one data set, for one strong/weak pair."""

    prompts: int
    strong_quality: float
    weak_quality: float
    apgr: float
    cpt50: float
    cpt80: float
    oracle_apgr: float
    aiq: float | None
    cost_strong_usd: float | None
    savings_at_95_usd: float | None
    strong_share_at_95: float

    def as_dict(self) -> dict[str, float | int | None]:
        """The report as a JSON-ready mapping."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def routing_curve(
    scores: Sequence[float] | FloatArray,
    strong: Sequence[float] | FloatArray,
    weak: Sequence[float] | FloatArray,
    strong_cost: Sequence[float] | FloatArray | None = None,
    weak_cost: Sequence[float] | FloatArray | None = None,
) -> RoutingCurve:
    """The routing curve of ``scores`` given each prompt's strong and weak quality (and cost)."""
    score = np.asarray(scores, dtype=np.float64)
    s = np.asarray(strong, dtype=np.float64)
    w = np.asarray(weak, dtype=np.float64)
    n = len(score)
    if n == 0 or len(s) != n or len(w) != n:
        raise EvaluationError(f"need equal, non-zero lengths; got {n} scores, {len(s)} strong, {len(w)} weak")
    order = np.argsort(-score, kind="stable")
    sorted_scores = score[order]
    # Curve points only where the score changes: ties are routed together.
    boundaries = np.flatnonzero(np.diff(sorted_scores) != 0) + 1
    ks = np.concatenate(([0], boundaries, [n]))
    gain = np.concatenate(([0.0], np.cumsum((s - w)[order])))
    quality = (w.sum() + gain[ks]) / n
    cost: FloatArray | None = None
    if strong_cost is not None and weak_cost is not None:
        sc = np.asarray(strong_cost, dtype=np.float64)
        wc = np.asarray(weak_cost, dtype=np.float64)
        extra = np.concatenate(([0.0], np.cumsum((sc - wc)[order])))
        cost = (wc.sum() + extra[ks]) / n
    return RoutingCurve(
        share=ks / n,
        quality=quality,
        cost=cost,
        strong_quality=float(s.mean()),
        weak_quality=float(w.mean()),
    )


def apgr(curve: RoutingCurve) -> float:
    """Area under PGR against the share of strong calls."""
    return float(np.trapezoid(curve.pgr(), curve.share))


def cpt(curve: RoutingCurve, target: float) -> float:
    """The smallest strong share at which PGR reaches ``target`` (0.5 for CPT(50%)); 1.0 if never."""
    pgr = curve.pgr()
    reached = np.flatnonzero(pgr >= target - 1e-12)
    if len(reached) == 0:
        return 1.0
    i = int(reached[0])
    if i == 0:
        return float(curve.share[0])
    x0, x1, y0, y1 = curve.share[i - 1], curve.share[i], pgr[i - 1], pgr[i]
    return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0))


def _upper_hull(x: FloatArray, y: FloatArray) -> tuple[FloatArray, FloatArray]:
    points = sorted(zip(x.tolist(), y.tolist(), strict=True), key=lambda p: (p[0], -p[1]))
    hull: list[tuple[float, float]] = []
    for point in points:
        if hull and point[0] == hull[-1][0]:
            continue  # same cost, lower or equal quality: never on the upper hull
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # Drop the middle point when it lies on or below the chord.
            if (x2 - x1) * (point[1] - y1) - (y2 - y1) * (point[0] - x1) >= 0:
                hull.pop()
            else:
                break
        hull.append(point)
    hx = np.array([p[0] for p in hull])
    hy = np.maximum.accumulate(np.array([p[1] for p in hull]))
    return hx, hy


def aiq(curve: RoutingCurve) -> float | None:
    """RouterBench's AIQ: area under the non-decreasing convex hull over the cost range."""
    if curve.cost is None:
        return None
    hx, hy = _upper_hull(curve.cost, curve.quality)
    span = float(hx[-1] - hx[0])
    if span <= 0:
        return float(hy.max())
    return float(np.trapezoid(hy, hx) / span)


def _first_reaching(curve: RoutingCurve, quality: float) -> int:
    reached = np.flatnonzero(curve.quality >= quality - 1e-12)
    return int(reached[0]) if len(reached) else len(curve.quality) - 1


def evaluate_scores(
    scores: Sequence[float] | FloatArray,
    strong: Sequence[float] | FloatArray,
    weak: Sequence[float] | FloatArray,
    strong_cost: Sequence[float] | FloatArray | None = None,
    weak_cost: Sequence[float] | FloatArray | None = None,
) -> RoutingReport:
    """Every metric for ``scores`` against per-prompt strong/weak quality (and cost)."""
    curve = routing_curve(scores, strong, weak, strong_cost, weak_cost)
    oracle = routing_curve(np.asarray(strong, dtype=np.float64) - np.asarray(weak, dtype=np.float64), strong, weak)
    at_95 = _first_reaching(curve, 0.95 * curve.strong_quality)
    cost_strong = float(curve.cost[-1]) if curve.cost is not None else None
    savings = cost_strong - float(curve.cost[at_95]) if curve.cost is not None and cost_strong is not None else None
    return RoutingReport(
        prompts=len(scores),
        strong_quality=curve.strong_quality,
        weak_quality=curve.weak_quality,
        apgr=apgr(curve),
        cpt50=cpt(curve, 0.5),
        cpt80=cpt(curve, 0.8),
        oracle_apgr=apgr(oracle),
        aiq=aiq(curve),
        cost_strong_usd=cost_strong,
        savings_at_95_usd=savings,
        strong_share_at_95=float(curve.share[at_95]),
    )


@dataclass(frozen=True, slots=True)
class PairSource:
    """Which of one source file's model names stood for the requested pair (None: not found)."""

    source: str
    prompts: int
    strong: str | None
    weak: str | None
    kept: int  # prompts with outcomes for both
    note: str = ""  # a requested name that matched two of its models by loose alias (taken as absent)

    def describe(self) -> str:
        """One line for the eval log."""
        if self.strong is None or self.weak is None:
            line = f"{self.source}: {self.prompts} prompts, skipped (no model matches the pair)"
        else:
            line = f"{self.source}: {self.kept} of {self.prompts} prompts, pair {self.strong} - {self.weak}"
        return f"{line}; {self.note}" if self.note else line


@dataclass(frozen=True, slots=True)
class PairData:
    """The prompts of a data set that have both models, as arrays, and the names used per file."""

    ids: list[str]
    prompts: list[str]
    strong: FloatArray
    weak: FloatArray
    strong_cost: FloatArray | None
    weak_cost: FloatArray | None
    sources: list[PairSource] = field(default_factory=list)
    # Prompts without a cost_usd for both models, and the first of them ("source id"), when some
    # have one: the costs are then left out (AIQ and the savings need every prompt's).
    without_cost: int = 0
    first_without_cost: str = ""


def pair_data(records: Sequence[OutcomeRecord], strong: str, weak: str) -> PairData:
    """The records with both ``strong`` and ``weak`` outcomes; costs only if every one has both.

    Each source file's model names are matched to ``strong`` and ``weak`` as ``fit`` matches them
    (exactly, else by loose alias: ``fitting.find_model``), so one folder may name the pair
    differently in each file; a name matching two models of a file by alias is taken as absent
    there (``PairSource.note``).
    """
    by_source: dict[str, list[OutcomeRecord]] = defaultdict(list)
    for record in records:
        by_source[record.source].append(record)
    kept: list[tuple[OutcomeRecord, str, str]] = []
    sources: list[PairSource] = []
    for source, rows in by_source.items():
        counts = Counter(model for row in rows for model in row.outcomes)
        strong_match, weak_match = find_model(strong, counts, len(rows)), find_model(weak, counts, len(rows))
        s, w = strong_match.name, weak_match.name
        note = "; ".join(filter(None, (strong_match.note("strong", strong), weak_match.note("weak", weak))))
        if s is not None and s == w:
            raise EvaluationError(
                f"the strong model {strong!r} and the weak model {weak!r} are the same model in {source}"
                f" ({s!r}; models match by id or loose alias): there is no choice to evaluate"
            )
        pairs = [(row, s, w) for row in rows if s is not None and w is not None and row.has_pair(s, w)]
        sources.append(PairSource(source, len(rows), s, w, len(pairs), note))
        kept.extend(pairs)
    if not kept:
        notes = "".join(f"; in {p.source} {p.note}" for p in sources if p.note)
        raise EvaluationError(
            f"no prompt has outcomes for both {strong!r} and {weak!r} (models match by id or loose alias){notes}"
        )
    costless = [r for r, s, w in kept if s not in r.cost_usd or w not in r.cost_usd]
    with_cost = not costless
    partly = 0 < len(costless) < len(kept)
    return PairData(
        ids=[r.id for r, _, _ in kept],
        prompts=[r.prompt for r, _, _ in kept],
        strong=np.array([r.outcomes[s] for r, s, _ in kept]),
        weak=np.array([r.outcomes[w] for r, _, w in kept]),
        strong_cost=np.array([r.cost_usd[s] for r, s, _ in kept]) if with_cost else None,
        weak_cost=np.array([r.cost_usd[w] for r, _, w in kept]) if with_cost else None,
        sources=sources,
        without_cost=len(costless) if partly else 0,
        first_without_cost=f"{costless[0].source} id {costless[0].id}" if partly else "",
    )


def require_plotting() -> None:
    """Raise ``EvaluationError`` naming the ``plot`` extra when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise EvaluationError("plotting needs matplotlib: pip install 'routesvc[plot]'") from exc


# Formats matplotlib lists that it cannot write without more than the plot extra (LaTeX).
_UNWRITTEN_FORMATS = frozenset({"pgf"})


def plot_format(out: Path) -> str:
    """The image format ``plot_curves`` writes ``out`` in: its extension (``.png``, ``.svg``,
    ``.pdf``...). Raises ``EvaluationError`` when matplotlib is missing, or the name has no
    extension or one matplotlib does not write, so a bad ``--plot`` fails before the work."""
    require_plotting()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    formats = sorted(set(FigureCanvasAgg.get_supported_filetypes()) - _UNWRITTEN_FORMATS)
    extension = out.suffix[1:].lower()
    if extension in formats:
        return extension
    has = f"ends in .{extension}, not an image format matplotlib writes" if extension else "has no extension"
    raise EvaluationError(
        f"--plot {out}: the file name {has}; the image format is the name's extension: .png, or one of"
        f" {', '.join('.' + name for name in formats if name != 'png')}"
    )


def plot_curves(
    curves: dict[str, RoutingCurve],
    out: Path,
    title: str = "",
) -> None:
    """Draw quality against strong share for each named curve, with weak/strong/random lines,
    into ``out`` in the format of its extension (``plot_format``).

    Needs matplotlib (the ``plot`` extra); raises ``EvaluationError`` naming it otherwise.
    """
    image_format = plot_format(out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    any_curve = next(iter(curves.values()))
    figure, axes = plt.subplots(figsize=(7, 4.5))
    try:
        for name, curve in curves.items():
            axes.plot(curve.share * 100, curve.quality, label=name, linewidth=1.5)
        axes.plot([0, 100], [any_curve.weak_quality, any_curve.strong_quality], "k:", label="random")
        axes.axhline(any_curve.weak_quality, color="grey", linestyle="--", label="always weak")
        axes.axhline(any_curve.strong_quality, color="red", linestyle="--", label="always strong")
        axes.set_xlabel("strong model calls (%)")
        axes.set_ylabel("mean quality")
        axes.set_title(title)
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(out, dpi=110, format=image_format)
    except (ValueError, RuntimeError) as exc:  # what matplotlib raises for a format it cannot write
        raise EvaluationError(f"--plot {out}: {exc}") from exc
    finally:
        plt.close(figure)
