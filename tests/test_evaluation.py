"""Routing metrics against small cases computed by hand."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import pytest

from routesvc.evaluation import EvaluationError, aiq, apgr, cpt, evaluate_scores, pair_data, routing_curve
from routesvc.outcomes import OutcomeRecord

# Four prompts. Strong gets 1,1,1,0 and weak 0,0,1,0: strong 0.75, weak 0.25, gap 0.5.
STRONG = [1.0, 1.0, 1.0, 0.0]
WEAK = [0.0, 0.0, 1.0, 0.0]


class TestRoutingCurve:
    def test_points_follow_the_score_order(self) -> None:
        """Sending the top-k prompts to the strong model gives quality weak + gained gaps / n."""
        curve = routing_curve([4, 3, 2, 1], STRONG, WEAK)
        assert curve.share.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert curve.quality.tolist() == [0.25, 0.5, 0.75, 0.75, 0.75]

    def test_ties_move_together(self) -> None:
        """Prompts with equal scores form one step; the line between is the random tie-break."""
        curve = routing_curve([1, 1, 0, 0], STRONG, WEAK)
        assert curve.share.tolist() == [0.0, 0.5, 1.0]
        assert curve.quality.tolist() == [0.25, 0.75, 0.75]

    def test_lengths_must_match(self) -> None:
        """Scores and outcomes of different lengths are refused."""
        with pytest.raises(EvaluationError):
            routing_curve([1, 2], [1.0], [0.0])


class TestAPGR:
    def test_perfect_order(self) -> None:
        """PGR 0, .5, 1, 1, 1 at shares 0..1 by quarters: trapezoids .0625 + .1875 + .25 + .25 = 0.75."""
        assert apgr(routing_curve([4, 3, 2, 1], STRONG, WEAK)) == pytest.approx(0.75)

    def test_worst_order(self) -> None:
        """Scoring the useless prompts first: PGR 0, 0, 0, .5, 1 gives 0 + 0 + .0625 + .1875 = 0.25."""
        assert apgr(routing_curve([1, 2, 3, 4], STRONG, WEAK)) == pytest.approx(0.25)

    def test_constant_score_is_random(self) -> None:
        """One tie group is the straight line from weak to strong: APGR 0.5."""
        assert apgr(routing_curve([0, 0, 0, 0], STRONG, WEAK)) == pytest.approx(0.5)

    def test_random_scores_average_one_half(self) -> None:
        """Random scores on many prompts give APGR near 0.5."""
        rng = np.random.default_rng(1)
        strong = rng.integers(0, 2, 4000).astype(float)
        weak = rng.integers(0, 2, 4000).astype(float) * strong
        assert apgr(routing_curve(rng.random(4000), strong, weak)) == pytest.approx(0.5, abs=0.03)


class TestCPT:
    def test_interpolates_the_first_crossing(self) -> None:
        """PGR reaches 0.5 at 25% strong calls exactly and 0.8 at 40% (0.5 + 0.3/0.5 * 0.25)."""
        curve = routing_curve([4, 3, 2, 1], STRONG, WEAK)
        assert cpt(curve, 0.5) == pytest.approx(0.25)
        assert cpt(curve, 0.8) == pytest.approx(0.40)


class TestAIQ:
    def test_area_under_the_cost_quality_hull(self) -> None:
        """Costs 1 (weak) and 3 (strong): quality .25->.5->.75 over cost 1..1.5..2 then flat to 3.

        Area = .5*(.25+.5)/2 + .5*(.5+.75)/2 + 1*.75 = 0.1875 + 0.3125 + 0.75 = 1.25, over a span of 2.
        """
        curve = routing_curve([4, 3, 2, 1], STRONG, WEAK, [3, 3, 3, 3], [1, 1, 1, 1])
        assert aiq(curve) == pytest.approx(0.625)

    def test_hull_ignores_points_below_it(self) -> None:
        """A bad order still scores the convex hull of its points (here the two endpoints)."""
        curve = routing_curve([1, 2, 3, 4], STRONG, WEAK, [3, 3, 3, 3], [1, 1, 1, 1])
        # Points (1,.25) (1.5,.25) (2,.25) (2.5,.5) (3,.75): the hull is the chord, mean (0.25+0.75)/2.
        assert aiq(curve) == pytest.approx(0.5)

    def test_needs_costs(self) -> None:
        """Without costs AIQ is not defined."""
        assert aiq(routing_curve([1, 2, 3, 4], STRONG, WEAK)) is None


class TestReport:
    def test_savings_at_95_percent_of_strong_quality(self) -> None:
        """95% of 0.75 is reached with the top two prompts: cost 1+2*0.5=2 per prompt vs 3."""
        report = evaluate_scores([4, 3, 2, 1], STRONG, WEAK, [3, 3, 3, 3], [1, 1, 1, 1])
        assert report.strong_share_at_95 == pytest.approx(0.5)
        assert report.savings_at_95_usd == pytest.approx(1.0)
        assert report.cost_strong_usd == pytest.approx(3.0)
        assert report.oracle_apgr == pytest.approx(0.75)
        assert report.prompts == 4


def _record(source: str, id_: str, prompt: str, outcomes: dict[str, float]) -> OutcomeRecord:
    return OutcomeRecord(id=id_, prompt=prompt, task="t", outcomes=MappingProxyType(outcomes), source=source)


class TestPairData:
    def test_each_record_keeps_its_own_prompt(self) -> None:
        """Records of two files with the same id keep their own prompts and outcomes, in order."""
        records = [
            _record("a", "q", "hard prompt", {"S": 1, "W": 0}),
            _record("b", "q", "easy prompt", {"S": 1, "W": 1}),
        ]
        pair = pair_data(records, "S", "W")
        assert (pair.ids, pair.prompts) == (["q", "q"], ["hard prompt", "easy prompt"])
        assert (pair.strong.tolist(), pair.weak.tolist()) == ([1.0, 1.0], [0.0, 1.0])

    def test_names_resolve_per_file_as_fit_resolves_them(self) -> None:
        """Each file's names match by id, else by loose alias among the models of (nearly) every
        prompt, as in fit; a rare variant with the same alias does not make the match ambiguous."""
        rare = _record("a", "3", "p3", {"S-v1": 0, "S_rare": 1, "W": 0})
        records = [
            _record("a", "1", "p1", {"S-v1": 1, "W": 0}),
            _record("a", "2", "p2", {"S-v1": 1, "W": 1}),
            rare,
            *[_record("a", f"{i}", "p", {"S-v1": 1, "W": 1}) for i in range(4, 21)],
            _record("b", "1", "p1", {"org/s": 1, "W_concise": 1}),
            _record("c", "1", "p1", {"X": 1, "Y": 0}),
        ]
        pair = pair_data(records, "s", "W")
        assert [(s.source, s.prompts, s.strong, s.weak, s.kept) for s in pair.sources] == [
            ("a", 20, "S-v1", "W", 20),
            ("b", 1, "org/s", "W_concise", 1),
            ("c", 1, None, None, 0),
        ]
        assert len(pair.prompts) == 21
        assert pair.strong[2] == 0.0

    def test_no_match_names_the_pair(self) -> None:
        """With no file holding the pair, the error names the requested models and how they match."""
        with pytest.raises(EvaluationError, match=r"'S' and 'W' \(models match by id or loose alias\)"):
            pair_data([_record("a", "1", "p", {"X": 1, "Y": 0})], "S", "W")
