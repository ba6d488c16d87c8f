"""Configuration: the typed tree is validated at start and names the file and field."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from routesvc.config import load_settings, parse_config
from routesvc.errors import ConfigError
from tests.conftest import default_config, settings_from


class TestEmbeddedDefault:
    def test_loads_the_seed_catalog_and_policy(self) -> None:
        """The embedded default has the three seed models at the seed prices."""
        settings = load_settings(environ={})
        prices = {m.id: (m.input_price_per_mtok, m.output_price_per_mtok) for m in settings.catalog}
        assert prices == {
            "gpt-4o-mini": (Decimal("0.15"), Decimal("0.60")),
            "gpt-4o": (Decimal("2.50"), Decimal("10.00")),
            "claude-sonnet": (Decimal("3.00"), Decimal("15.00")),
        }
        assert settings.config.routing.default_model == "gpt-4o-mini"

    def test_config_path_comes_from_the_environment_variable(self, tmp_path: Path) -> None:
        """ROUTESVC_CONFIG names the file when no path is given."""
        config = default_config()
        config["server"] = {"port": 6123}
        path = tmp_path / "c.yaml"
        import yaml

        path.write_text(yaml.safe_dump(config))
        assert load_settings(environ={"ROUTESVC_CONFIG": str(path)}).config.server.port == 6123


class TestCredentials:
    def test_keys_and_base_urls_come_from_the_sdk_variables(self) -> None:
        """OPENAI_API_KEY / OPENAI_BASE_URL and the Anthropic pair configure the providers."""
        env = {
            "OPENAI_API_KEY": "sk-a",
            "OPENAI_BASE_URL": "http://127.0.0.1:1/v1",
            "ANTHROPIC_API_KEY": "sk-b",
            "ANTHROPIC_BASE_URL": "http://127.0.0.1:2",
        }
        providers = load_settings(environ=env).providers
        assert (providers["openai"].api_key, providers["openai"].base_url) == ("sk-a", "http://127.0.0.1:1/v1")
        assert (providers["anthropic"].api_key, providers["anthropic"].base_url) == ("sk-b", "http://127.0.0.1:2")

    def test_a_missing_key_names_the_variable(self) -> None:
        """A provider without a key is unconfigured, and says which variable to set."""
        provider = load_settings(environ={}).providers["openai"]
        assert not provider.configured
        assert "OPENAI_API_KEY" in provider.missing_key_reason

    def test_keys_can_come_from_a_file(self, tmp_path: Path) -> None:
        """api_key_file reads a mounted secret."""
        (tmp_path / "key").write_text("sk-from-file\n")
        config = default_config()
        config["providers"] = {
            "openai": {"kind": "openai", "api_key_file": str(tmp_path / "key")},
            "anthropic": {"kind": "anthropic"},
        }
        assert settings_from(config).providers["openai"].api_key == "sk-from-file"

    def test_repr_never_shows_the_key(self) -> None:
        """Debug output of provider settings never contains the key."""
        provider = load_settings(environ={"OPENAI_API_KEY": "sk-canary-123"}).providers["openai"]
        assert "sk-canary-123" not in repr(provider)

    def test_inline_keys_are_refused(self) -> None:
        """A key written in the file is an error naming the provider field."""
        config = default_config()
        config["providers"] = {"openai": {"kind": "openai", "api_key": "sk-x"}, "anthropic": {"kind": "anthropic"}}
        with pytest.raises(ConfigError, match=r"<test>: providers\.openai: inline api_key is not allowed"):
            settings_from(config)


class TestValidation:
    @pytest.mark.parametrize(
        ("mutate", "expected"),
        [
            (lambda c: c["routing"].update(default_model="nope"), r"routing\.default_model: unknown model 'nope'"),
            (
                lambda c: c["routing"]["stages"][1]["rules"][0].update(model="nope"),
                r"routing\.stages\[1\]\.rules\[0\]\.model: unknown model 'nope'",
            ),
            (
                lambda c: c["routing"]["stages"][1]["rules"][0].update(when={"last_user_message_matches": "("}),
                r"routing\.stages\[1\]\.rules\[0\]\.when\.last_user_message_matches: .*invalid regex",
            ),
            (
                lambda c: c["routing"]["stages"][1]["rules"][0].update(when={"colour": "red"}),
                r"routing\.stages\[1\]\.rules\[0\]\.when\.colour: Extra inputs are not permitted",
            ),
            (lambda c: c["models"][0].update(provider="azure"), r"models\[0\]\.provider: unknown provider 'azure'"),
            (lambda c: c["models"][0].update(input_price_per_mtok="-1"), r"models\[0\]\.input_price_per_mtok"),
            (lambda c: c["server"].update(port=70000), r"server\.port"),
            (lambda c: c.setdefault("batch", {}).update(max_group_size=50_001), r"batch\.max_group_size"),
            (
                lambda c: c["routing"]["stages"].__setitem__(0, {"kind": "classifier", "method": "llm", "model": "x"}),
                r"routing\.stages\[0\]\.model: unknown model 'x'",
            ),
            (
                lambda c: c["routing"]["stages"].__setitem__(0, {"kind": "classifier", "method": "llm"}),
                r"routing\.stages\[0\]\.model: the llm method needs a catalog model id",
            ),
            (
                lambda c: c["routing"]["stages"][1]["rules"][0]["when"].update(complexity_in=["high"]),
                r"routing\.stages\[1\]\.rules\[0\]\.when\.complexity_in: only a classifier stage with method llm"
                r" judges complexity, and none comes before this rules stage",
            ),
            (
                lambda c: c["routing"]["stages"][1]["rules"][0]["when"].update(complexity_in=["extreme"]),
                r"routing\.stages\[1\]\.rules\[0\]\.when\.complexity_in\[0\]: "
                r"Input should be 'low', 'medium' or 'high'",
            ),
            (
                lambda c: c.setdefault("telemetry", {}).update(stats_window_seconds=float("inf")),
                r"telemetry\.stats_window_seconds",
            ),
            (
                lambda c: c.setdefault("reliability", {}).update(backoff_seconds=float("nan")),
                r"reliability\.backoff_seconds",
            ),
        ],
    )
    def test_invalid_values_name_the_field(self, mutate: object, expected: str) -> None:
        """Each invalid value fails at load with the file and the field path."""
        config = default_config()
        mutate(config)  # type: ignore[operator]
        with pytest.raises(ConfigError, match=expected):
            settings_from(config)

    def test_a_cross_reference_error_reads_file_then_field(self) -> None:
        """A check across sections (a rule naming an unknown model) reads like every other:
        "<file>: <field path>: <problem>", with no "(top level)" in between."""
        config = default_config()
        config["routing"]["stages"][1]["rules"][0]["model"] = "gpt-5"  # type: ignore[index]
        with pytest.raises(ConfigError) as caught:
            settings_from(config)
        assert caught.value.message.split(": ", 1)[1] == "routing.stages[1].rules[0].model: unknown model 'gpt-5'"

    def test_unreadable_file_is_named(self, tmp_path: Path) -> None:
        """A missing file fails with its path."""
        with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read"):
            load_settings(tmp_path / "missing.yaml", environ={})

    def test_not_yaml_is_named(self) -> None:
        """Broken YAML fails with the source name."""
        with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
            parse_config("a: [", "bad.yaml", {})

    def test_an_unknown_http_client_is_named(self) -> None:
        """providers.<name>.http_client is aiohttp or httpx; anything else names the field."""
        config = default_config()
        config["providers"]["openai"]["http_client"] = "requests"  # type: ignore[index]
        with pytest.raises(ConfigError, match=r"providers\.openai\.http_client"):
            settings_from(config)

    def test_compatible_providers_need_a_base_url(self) -> None:
        """kind openai_compatible without base_url is refused."""
        config = default_config()
        config["providers"]["local"] = {"kind": "openai_compatible"}  # type: ignore[index]
        with pytest.raises(ConfigError, match=r"providers\.local: .*base_url is required"):
            settings_from(config)


class TestHttpClient:
    def test_adapters_use_aiohttp_unless_a_provider_says_httpx(self) -> None:
        """Every provider's SDK runs on its aiohttp transport unless ``http_client: httpx`` puts it
        on the SDK's own default client."""
        from routesvc.server import build_providers

        config = default_config()
        config["providers"]["openai"]["http_client"] = "httpx"  # type: ignore[index]
        keys = {"OPENAI_API_KEY": "sk-openai", "ANTHROPIC_API_KEY": "sk-anthropic"}
        providers = build_providers(settings_from(config, keys))
        assert {name: getattr(p, "http_client", None) for name, p in providers.items()} == {
            "openai": "httpx",
            "anthropic": "aiohttp",
        }
