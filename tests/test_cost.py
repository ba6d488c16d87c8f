"""Cost arithmetic: Decimal USD from tokens and catalog prices."""

from __future__ import annotations

from decimal import Decimal

from routesvc.catalog import ModelSpec
from routesvc.config import load_settings
from routesvc.cost import cost_of_usage, estimate_cost, format_usd, interrupted_usage
from routesvc.models import ChatRequest, Image, Message, Mode, Role, Usage
from routesvc.tokens import count_text_tokens, estimate_input_tokens
from tests.conftest import default_config, settings_from


def _model(model_id: str) -> ModelSpec:
    return load_settings(environ={}).catalog.get(model_id)


class TestCost:
    def test_exact_cost_is_tokens_times_price(self) -> None:
        """1,000 input and 500 output tokens on gpt-4o-mini cost 0.00015 + 0.0003 USD."""
        assert cost_of_usage(_model("gpt-4o-mini"), Usage(1000, 500)) == Decimal("0.00045")

    def test_cached_input_tokens_are_billed_at_the_cached_price(self) -> None:
        """Of 1,000 input tokens, 400 cached on gpt-4o: 600 x 2.50 + 400 x 1.25 per 1M."""
        usage = Usage(input_tokens=1000, output_tokens=0, cached_input_tokens=400)
        assert cost_of_usage(_model("gpt-4o"), usage) == Decimal("0.002")

    def test_cache_writes_are_billed_at_the_cache_write_prices(self) -> None:
        """Of 1,000 input tokens on claude-sonnet ($3 in), 100 read from the cache, 300 written to the
        5-minute cache and 200 to the 1-hour one: 400 x 3 + 100 x 0.30 + 300 x 3.75 + 200 x 6 per 1M."""
        usage = Usage(
            input_tokens=1000,
            output_tokens=0,
            cached_input_tokens=100,
            cache_write_input_tokens=500,
            cache_write_1h_input_tokens=200,
        )
        assert cost_of_usage(_model("claude-sonnet"), usage) == Decimal("0.003555")

    def test_cache_parts_never_count_more_than_the_input(self) -> None:
        """Counts that add up to more than ``input_tokens`` bill no token twice: reads first, then writes."""
        usage = Usage(input_tokens=100, output_tokens=0, cached_input_tokens=60, cache_write_input_tokens=80)
        model = _model("claude-sonnet")
        assert cost_of_usage(model, usage) == (60 * model.cached_input_price_per_mtok + 40 * Decimal("3.75")) / 10**6

    def test_cache_write_prices_default_by_provider_kind(self) -> None:
        """An anthropic model's cache writes default to 1.25x (5-minute) and 2x (1-hour) its input
        price; any other model's to its input price."""
        sonnet, mini = _model("claude-sonnet"), _model("gpt-4o-mini")
        assert (sonnet.cache_write_price_per_mtok, sonnet.cache_write_1h_price_per_mtok) == (
            Decimal("3.75"),
            Decimal(6),
        )
        assert (mini.cache_write_price_per_mtok, mini.cache_write_1h_price_per_mtok) == (
            mini.input_price_per_mtok,
            mini.input_price_per_mtok,
        )

    def test_configured_cache_write_prices_win(self) -> None:
        """``cache_write_price_per_mtok`` and ``cache_write_1h_price_per_mtok`` set in the config are used as given."""
        config = default_config()
        for model in config["models"]:  # type: ignore[attr-defined]
            if model["id"] == "claude-sonnet":
                model.update(cache_write_price_per_mtok="4", cache_write_1h_price_per_mtok="7")
        spec = settings_from(config).catalog.get("claude-sonnet")
        assert (spec.cache_write_price_per_mtok, spec.cache_write_1h_price_per_mtok) == (Decimal(4), Decimal(7))

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


class TestInterruptedUsage:
    """``interrupted_usage``: what the ledger, the attempt's span and a side call charge for a
    call cut short before its final usage."""

    _CHAT = ChatRequest(messages=(Message(Role.USER, "What is the capital of France?"),))

    def test_the_input_the_provider_reported_is_kept_and_the_output_counted(self) -> None:
        """Anthropic's message_start told the input with its cache reads and writes: they stand
        as told; only the output is estimated, from every piece produced, joined."""
        reported = Usage(input_tokens=1000, cached_input_tokens=200, cache_write_input_tokens=100)
        usage = interrupted_usage(_model("claude-sonnet"), self._CHAT, ["Par", "is is"], reported)
        expected = Usage(1000, count_text_tokens("Paris is"), cached_input_tokens=200, cache_write_input_tokens=100)
        assert expected == usage

    def test_without_a_report_the_input_is_the_chat_counted_for_the_model(self) -> None:
        """No report: the input is the chat's estimate, its image by the model's formula and at
        its ``image_token_scale`` (gpt-4o-mini: OpenAI's 765 tokens for a 1024 px square image,
        x 33.33 = 25,497.45, rounded up)."""
        image = Image(media_type="image/png", data=b"png", width=1024, height=1024)
        chat = ChatRequest(messages=(Message(Role.USER, "What is in it?", parts=("What is in it?", image)),))
        text = ChatRequest(messages=(Message(Role.USER, "What is in it?"),))
        usage = interrupted_usage(_model("gpt-4o-mini"), chat, ["It is"], None)
        assert Usage(estimate_input_tokens(text) + 25498, count_text_tokens("It is")) == usage
