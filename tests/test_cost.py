"""Cost arithmetic: Decimal USD from tokens and catalog prices."""

from __future__ import annotations

from decimal import Decimal

from routesvc.config import load_settings
from routesvc.cost import cost_of_usage, estimate_cost, format_usd
from routesvc.models import Mode, Usage


def _model(model_id: str):  # type: ignore[no-untyped-def]
    return load_settings(environ={}).catalog.get(model_id)


class TestCost:
    def test_exact_cost_is_tokens_times_price(self) -> None:
        """1,000 input and 500 output tokens on gpt-4o-mini cost 0.00015 + 0.0003 USD."""
        assert cost_of_usage(_model("gpt-4o-mini"), Usage(1000, 500)) == Decimal("0.00045")

    def test_cached_input_tokens_are_billed_at_the_cached_price(self) -> None:
        """Of 1,000 input tokens, 400 cached on gpt-4o: 600 x 2.50 + 400 x 1.25 per 1M."""
        usage = Usage(input_tokens=1000, output_tokens=0, cached_input_tokens=400)
        assert cost_of_usage(_model("gpt-4o"), usage) == Decimal("0.002")

    def test_batch_mode_applies_the_discount(self) -> None:
        """The batch price is the realtime price less the catalog's batch discount."""
        model = _model("claude-sonnet")
        assert estimate_cost(model, 1000, 1000, Mode.BATCH) == estimate_cost(model, 1000, 1000) / 2

    def test_cheap_requests_keep_their_precision(self) -> None:
        """A one-token request is a few millionths of a dollar, exactly."""
        assert format_usd(cost_of_usage(_model("gpt-4o-mini"), Usage(1, 1))) == "0.00000075"

    def test_format_has_no_exponent(self) -> None:
        """Money strings are plain decimals."""
        assert (format_usd(Decimal("1E-7")), format_usd(Decimal("12.500")), format_usd(Decimal(0))) == (
            "0.0000001",
            "12.5",
            "0",
        )
