"""Configuration: the typed tree is validated at start and names the file and field."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from routesvc.config import MAX_CONNECTION_AGE_SECONDS, MAX_REQUEST_BYTES, load_settings, parse_config
from routesvc.errors import ConfigError
from routesvc.server import Server
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

    def test_a_key_file_that_is_not_utf8_leaves_the_provider_unconfigured(self, tmp_path: Path) -> None:
        """A binary file mounted as the key (the wrong Secret key) is a key no header can carry:
        the provider says so, and why (reading it raised UnicodeDecodeError, a traceback at start;
        then it was said to have spaces or control characters)."""
        (tmp_path / "key").write_bytes(b"\xff\xfesk-binary")
        config = default_config()
        config["providers"] = {
            "openai": {"kind": "openai", "api_key_file": str(tmp_path / "key")},
            "anthropic": {"kind": "anthropic"},
        }
        provider = settings_from(config).providers["openai"]
        assert not provider.configured
        assert provider.missing_key_reason == (
            "provider 'openai': the API key in its api_key_file is not UTF-8 text, which an HTTP header cannot carry"
        )

    def test_a_key_from_the_environment_is_stripped_as_a_file_key_is(self) -> None:
        """A secret made from a file ends in a newline: the key sent is without it."""
        provider = load_settings(environ={"OPENAI_API_KEY": "sk-from-secret\n"}).providers["openai"]
        assert provider.api_key == "sk-from-secret"
        assert provider.configured

    @pytest.mark.parametrize("key", ["sk-one\nsk-two", "sk one", "sk-\x00nul", "sk-caf\u00e9"])
    def test_a_key_no_header_can_carry_leaves_the_provider_unconfigured_naming_where_it_came_from(
        self, key: str
    ) -> None:
        """Such a key would fail every call as a broken stream; instead the provider says why."""
        provider = load_settings(environ={"OPENAI_API_KEY": key}).providers["openai"]
        assert not provider.configured
        assert provider.api_key is None
        assert "environment variable OPENAI_API_KEY" in provider.missing_key_reason
        assert key not in provider.missing_key_reason

    def test_repr_never_shows_the_key(self) -> None:
        """Debug output of provider settings never contains the key."""
        provider = load_settings(environ={"OPENAI_API_KEY": "sk-canary-123"}).providers["openai"]
        assert "sk-canary-123" not in repr(provider)

    @pytest.mark.parametrize(
        ("value", "problem"),
        [
            ("sk-proj-REALSECRET1234567890", "this looks like an API key pasted in place of a variable name"),
            ("AIzaSyREALSECRET1234567890abcd", "this looks like an API key pasted in place of a variable name"),
            ("my key", "must be the name of an environment variable"),
            ("1OPENAI_KEY", "must be the name of an environment variable"),
            ("", "must be the name of an environment variable"),
        ],
    )
    def test_api_key_env_is_a_variable_name_never_quoted(self, value: str, problem: str) -> None:
        """api_key_env holding anything but a variable's name (a key pasted there, above all) is an
        error naming the field that never quotes the value, nor does the pydantic error it is
        chained from: it was accepted, and the key then appeared in the logs, ListModels and every
        FAILED_PRECONDITION message."""
        config = default_config()
        config["providers"]["openai"]["api_key_env"] = value  # type: ignore[index]
        with pytest.raises(ConfigError) as caught:
            settings_from(config)
        assert caught.value.message.startswith(f"<test>: providers.openai.api_key_env: {problem}")
        assert not value or value not in caught.value.message + str(caught.value.__cause__)

    def test_api_key_env_names_the_variable_read(self) -> None:
        """A variable's name in api_key_env is where the key comes from."""
        config = default_config()
        config["providers"]["openai"]["api_key_env"] = "team_b_OPENAI_KEY2"  # type: ignore[index]
        assert settings_from(config, {"team_b_OPENAI_KEY2": "sk-b"}).providers["openai"].api_key == "sk-b"

    def test_inline_keys_are_refused(self) -> None:
        """A key written in the file is an error naming the provider field."""
        config = default_config()
        config["providers"] = {"openai": {"kind": "openai", "api_key": "sk-x"}, "anthropic": {"kind": "anthropic"}}
        with pytest.raises(ConfigError, match=r"<test>: providers\.openai: inline api_key is not allowed"):
            settings_from(config)


def _embedding_stage(feedback_db: str) -> dict[str, object]:
    """An embedding stage keeping its feedback in ``feedback_db`` (its router is not read here)."""
    return {"kind": "embedding", "router": "router", "feedback_db": feedback_db}


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
                lambda c: c["routing"]["stages"][1]["rules"][0].update(when={"metadata": {}}),
                r"routing\.stages\[1\]\.rules\[0\]\.when\.metadata: must not be empty \(it would"
                r" match every request\); leave the condition out instead",
            ),
            (
                lambda c: c["routing"]["stages"][1]["rules"][0].update(when={"task_in": []}),
                r"routing\.stages\[1\]\.rules\[0\]\.when\.task_in: must not be empty \(it would"
                r" match no request\)",
            ),
            (
                lambda c: c["routing"]["stages"][1]["rules"][0].update(when={"last_user_message_matches": ""}),
                r"routing\.stages\[1\]\.rules\[0\]\.when\.last_user_message_matches: must not be empty \(it"
                r" would match every request\); leave the condition out instead",
            ),
            (
                lambda c: c["routing"]["stages"][1]["rules"][0].update(when={"metadata": {"": "x"}}),
                r"routing\.stages\[1\]\.rules\[0\]\.when\.metadata: a key must not be empty \(no request"
                r" carries an empty key, so it would match no request\)",
            ),
            (
                lambda c: c["routing"]["stages"][1]["rules"][0].update(when={"tools_gt": -1}),
                r"routing\.stages\[1\]\.rules\[0\]\.when\.tools_gt: Input should be greater than or equal to 0",
            ),
            (
                lambda c: c["routing"]["stages"][1]["rules"][0].update(when={"input_tokens_gt": -1}),
                r"routing\.stages\[1\]\.rules\[0\]\.when\.input_tokens_gt: Input should be greater than or equal"
                r" to 0",
            ),
            (
                lambda c: c["routing"]["stages"][1]["rules"][0].update(when={"input_tokens_lt": 0}),
                r"routing\.stages\[1\]\.rules\[0\]\.when\.input_tokens_lt: Input should be greater than 0",
            ),
            (
                lambda c: c["routing"]["stages"][1]["rules"][0].update(when={"colour": "red"}),
                r"routing\.stages\[1\]\.rules\[0\]\.when\.colour: Extra inputs are not permitted",
            ),
            (
                lambda c: c["routing"].update(stages=[_embedding_stage("f.db"), _embedding_stage("logs/../f.db")]),
                r"routing\.stages\[1\]\.feedback_db: 'logs/\.\./f\.db' is routing\.stages\[0\]'s feedback_db too",
            ),
            (
                lambda c: c["routing"].update(stages=[{**_embedding_stage("f.db"), "feedback_max_examples": 0}]),
                r"routing\.stages\[0\]\.feedback_max_examples",
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
                lambda c: c["models"][2].update(capabilities=["tool", "vision", "json"]),
                r"models\[2\]\.capabilities\[0\]: Input should be 'tools', 'vision' or 'json'",
            ),
            (
                lambda c: c["server"].update(max_connection_age_seconds=2_592_000),
                r"server\.max_connection_age_seconds: Input should be less than or equal to 2147483$",
            ),
            (
                lambda c: c["limits"].update(max_request_bytes=2_147_483_647),
                r"limits\.max_request_bytes: Input should be less than or equal to 2147482623$",
            ),
            (
                lambda c: c["limits"].update(default_output_tokens=20_000),
                r"limits\.default_output_tokens: 20000 is more than the max_output_tokens of model 'gpt-4o-mini'"
                r" \(16384\)",
            ),
            (
                lambda c: c.update(tenants={"acme": {"tokens_per_minute": 500}}),
                r"tenants\.acme\.tokens_per_minute: 500 is not more than limits\.default_output_tokens \(512\)",
            ),
            (
                lambda c: c.update(
                    auth={"enabled": True},
                    tenants={
                        "acme": {"api_key_sha256": ["a" * 64]},
                        "globex": {"api_key_sha256": ["b" * 64, "a" * 64]},
                    },
                ),
                r"tenants\.globex\.api_key_sha256\[1\]: the same key digest as tenants\.acme\.api_key_sha256\[0\],"
                r" a key of tenant 'acme'; a key belongs to one tenant",
            ),
            (
                lambda c: (
                    c.update(auth={"enabled": True}, tenants={"acme": {"api_key_sha256": ["a" * 64]}}),
                    c["routing"]["stages"][1]["rules"][0]["when"].update(tenant_in=["acme", "acmee"]),
                ),
                r"routing\.stages\[1\]\.rules\[0\]\.when\.tenant_in: unknown tenant 'acmee'; with auth\.enabled",
            ),
            (
                lambda c: c.setdefault("telemetry", {}).update(stats_window_seconds=float("inf")),
                r"telemetry\.stats_window_seconds",
            ),
            (
                lambda c: c.setdefault("reliability", {}).update(backoff_seconds=float("nan")),
                r"reliability\.backoff_seconds",
            ),
            (
                lambda c: c.setdefault("reliability", {}).update(max_event_bytes=100),
                r"reliability\.max_event_bytes",
            ),
            (
                lambda c: c["routing"]["stages"].__setitem__(
                    0, {"kind": "classifier", "method": "llm", "model": "gpt-4o-mini", "timeout_s": float("inf")}
                ),
                r"routing\.stages\[0\]\.timeout_s: Input should be a finite number",
            ),
            (
                lambda c: c["routing"].update(
                    stages=[{**_embedding_stage("f.db"), "feedback_decision_ttl_seconds": float("inf")}]
                ),
                r"routing\.stages\[0\]\.feedback_decision_ttl_seconds: Input should be a finite number",
            ),
            # A judge asked for more output than its model gives: every judge call refused (400).
            (
                lambda c: c["cascade"]["judge"].update(max_output_tokens=100_000),
                r"cascade\.judge\.max_output_tokens: 100000 is more than the max_output_tokens of the judge model"
                r" 'gpt-4o-mini' \(16384\)",
            ),
            # The judge listed twice: two paid calls for one verdict.
            (
                lambda c: c["cascade"].update(scorers=["local", "llm_judge", "llm_judge"]),
                r"cascade: scorers\[2\]: llm_judge is listed twice",
            ),
            # A threshold on the last step, which nothing reads.
            (
                lambda c: c["cascade"]["chains"][0]["steps"][1].update(threshold=0.9),
                r"cascade\.chains\[0\]: steps\[1\]\.threshold: the last step's answer is always released",
            ),
        ],
    )
    def test_invalid_values_name_the_field(self, mutate: object, expected: str) -> None:
        """Each invalid value fails at load with the file and the field path."""
        config = default_config()
        mutate(config)  # type: ignore[operator]
        with pytest.raises(ConfigError, match=expected):
            settings_from(config)

    def test_tenant_in_may_name_any_tenant_without_auth(self) -> None:
        """Without auth a request names its own tenant, so a rule's tenant_in may name one that is
        not configured."""
        config = default_config()
        config["routing"]["stages"][1]["rules"][0]["when"]["tenant_in"] = ["acme"]  # type: ignore[index]
        settings_from(config)

    async def test_the_largest_bounds_start_a_server(self) -> None:
        """The largest max_connection_age_seconds and max_request_bytes the config takes fit gRPC's
        32-bit options: a server starts with them (larger ones failed its start with OverflowError)."""
        config = default_config()
        config["server"]["max_connection_age_seconds"] = MAX_CONNECTION_AGE_SECONDS  # type: ignore[index]
        config["limits"]["max_request_bytes"] = MAX_REQUEST_BYTES  # type: ignore[index]
        async with Server(settings_from(config), port=0) as server:
            assert server.target

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

    def test_a_file_that_is_not_utf8_is_named(self, tmp_path: Path) -> None:
        """A config file in Latin-1 is a ConfigError naming it (it was a UnicodeDecodeError and a
        traceback at start; a reload already said so)."""
        path = tmp_path / "latin1.yaml"
        path.write_bytes(yaml.safe_dump(default_config()).encode("utf-8") + "# café\n".encode("latin-1"))
        with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text$"):
            load_settings(path, environ={})

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


class TestProviderBaseUrl:
    @pytest.mark.parametrize(
        ("url", "problem"),
        [
            ("127.0.0.1:8089", "not an absolute http(s) URL with a host"),
            ("not-a-url", "not an absolute http(s) URL with a host"),
            ("ftp://gateway/v1", "not an absolute http(s) URL with a host"),
            ("http:///v1", "not an absolute http(s) URL with a host"),
            ("http://gateway:S3cretPw/v1", "not an absolute http(s) URL with a host"),
            ("http://user:S3cretPw@gateway/v1", "credentials in the URL (user:password@) are not supported"),
            *(
                (url, "whitespace or a control character in the URL")
                for url in (
                    "http://gateway:8089/S3cretPw\n",
                    " http://gateway:8089/S3cretPw",
                    "http://gateway:8089/S3cretPw ",
                    "http://gate\nway:8089/S3cretPw",
                    "http://gateway:8089/S3cret\tPw",
                    "http://gateway:8089/S3cretPw\r\n",
                    "\x00http://gateway:8089/S3cretPw",
                    "http://gateway:8089/S3cretPw\u00a0",
                    "http://gateway:8089/S3cretPw\u2028",  # a line separator
                )
            ),
            *(
                (url, "an invisible character in the URL")
                for url in (
                    "http://api.example\u200b.com/S3cretPw",  # zero-width space
                    "http://api.exa\u00admple.com/S3cretPw",  # soft hyphen
                    "http://\u2060gateway:8089/S3cretPw",  # word joiner
                    "http://gate\ufeffway:8089/S3cretPw",  # a byte order mark inside
                    "\ufeffhttp://gateway:8089/S3cretPw",  # ... or leading
                    "http://gateway:8089/S3cret\u200bPw",  # in the path too
                )
            ),
            ("http://gateway.ho\u0301st:8089/S3cretPw", "a host the HTTP client refuses"),  # not NFC
            ("http://-b\u00fccher.example:8089/S3cretPw", "a host the HTTP client refuses"),  # a leading hyphen
        ],
    )
    @pytest.mark.parametrize("source", ["file", "variable"])
    def test_a_url_the_http_client_cannot_use_is_named_never_quoted(self, url: str, problem: str, source: str) -> None:
        """A provider base URL without a scheme or a host, with credentials, or with whitespace or
        a control character anywhere (a trailing newline from a mounted secret's file; not
        stripped), in the file or in the SDK's variable, is an error at load naming where it came
        from, without the URL: it started cleanly and then failed every call as a provider outage
        ("connection failed", or a "malformed stream" as aiohttp refused the credentials beside
        the key, or HTTP 404 for a trailing space), opening the breaker, or failed the start with
        httpx's traceback (a newline): urlsplit dropped those characters and passed it. So is an
        invisible character (pasted from a web page) or a host httpx's IDNA check refuses, which
        urlsplit passed and failed the start with a traceback printing the host."""
        config = default_config()
        environ = {"ANTHROPIC_API_KEY": "sk-b"}
        if source == "file":
            config["providers"]["anthropic"]["base_url"] = url  # type: ignore[index]
        else:
            environ["ANTHROPIC_BASE_URL"] = url
        with pytest.raises(ConfigError) as caught:
            settings_from(config, environ)
        where = "providers.anthropic.base_url" if source == "file" else "$ANTHROPIC_BASE_URL"
        assert caught.value.message.startswith(f"<test>: {where}: {problem}")
        assert "S3cretPw" not in caught.value.message
        assert (caught.value.__cause__, caught.value.__context__) == (None, None)

    def test_a_compatible_providers_url_is_checked_too(self) -> None:
        """kind openai_compatible's required base_url is held to the same rule."""
        config = default_config()
        config["providers"]["local"] = {"kind": "openai_compatible", "base_url": "localhost:8000/v1"}  # type: ignore[index]
        with pytest.raises(ConfigError, match=r"^<test>: providers\.local\.base_url: not an absolute http\(s\) URL"):
            settings_from(config)

    @pytest.mark.parametrize(
        "url",
        ["http://127.0.0.1:8089", "https://gateway.internal/v1/", "http://[::1]:8000/v1", "http://bücher.example/v1"],
    )
    def test_an_absolute_http_url_is_kept_as_written(self, url: str) -> None:
        """http and https URLs with a host (a name, IPv4 or IPv6, a port or none) are used as written."""
        config = default_config()
        config["providers"]["openai"]["base_url"] = url  # type: ignore[index]
        assert settings_from(config).providers["openai"].base_url == url


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


class TestYamlKeys:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (
                "tenants:\n  acme: {}\n  globex: {}\n  acme: {user_tier: premium}\n",
                "tenants.acme: written twice (lines 2 and 4)",
            ),
            ("a: 1\nb: 2\na: 3\n", "a: written twice (lines 1 and 3)"),
            ("models:\n- id: x\n  provider: p\n  id: y\n", "models[0].id: written twice (lines 2 and 4)"),
        ],
    )
    def test_a_key_written_twice_is_refused_by_its_path(self, text: str, expected: str) -> None:
        """A mapping key written twice is an error naming its path and lines, not its values
        (PyYAML kept the last silently: a tenant written again lost its budget and allow-list)."""
        with pytest.raises(ConfigError) as caught:
            parse_config(text, "dup.yaml", {})
        assert caught.value.message == f"dup.yaml: {expected}; YAML would keep the last one only"

    def test_merge_keys_may_be_overridden(self) -> None:
        """A key that overrides one a merge key (<<) brought is what YAML means, not a repeat."""
        text = yaml.safe_dump(default_config()) + (
            "tenants:\n  acme: &base {requests_per_minute: 5}\n  globex:\n    <<: *base\n    requests_per_minute: 7\n"
        )
        tenants = parse_config(text, "merge.yaml", {}).config.tenants
        assert (tenants["acme"].requests_per_minute, tenants["globex"].requests_per_minute) == (5, 7)

    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            ("123", 'tenants: YAML reads the name 123 as a number: quote it as written, e.g. "123":'),
            (
                "no",
                "tenants: YAML reads the name false as a boolean (unquoted yes, no, on, off, true and false are):"
                ' quote it as written, e.g. "no":',
            ),
        ],
    )
    def test_a_tenant_name_yaml_reads_as_a_value_says_to_quote_it(self, name: str, expected: str) -> None:
        """A tenant named 123 or no (YAML reads a number or a boolean) says to quote the name, instead
        of "tenants[123].[key]: Input should be a valid string"."""
        text = yaml.safe_dump(default_config()) + f"tenants:\n  {name}:\n    requests_per_minute: 5\n"
        with pytest.raises(ConfigError) as caught:
            parse_config(text, "t.yaml", {})
        assert caught.value.message == f"t.yaml: {expected}"


class TestRedisUrl:
    @pytest.mark.parametrize(
        ("url", "problem"),
        [
            ("http://user:S3cretPw@localhost:6379/0", "must start with redis://, rediss:// or unix://"),
            ("redis://default:S3cretPw/0", "not a valid Redis URL"),
            ("redis://:S3cretPw@localhost:notaport/0", "not a valid Redis URL"),
        ],
    )
    @pytest.mark.parametrize("source", ["file", "variable"])
    def test_a_bad_url_is_named_never_quoted(self, url: str, problem: str, source: str) -> None:
        """A Redis URL redis-py cannot parse, in the file or in $ROUTESVC_REDIS_URL, is an error at
        load naming where it came from, without the URL (it failed the start with a traceback that
        printed the password)."""
        config = default_config()
        environ = {}
        if source == "file":
            config["shared_state"] = {"redis_url": url}
        else:
            environ["ROUTESVC_REDIS_URL"] = url
        with pytest.raises(ConfigError) as caught:
            settings_from(config, environ)
        where = "shared_state.redis_url" if source == "file" else "$ROUTESVC_REDIS_URL"
        assert caught.value.message.startswith(f"<test>: {where}: {problem}")
        assert "S3cretPw" not in caught.value.message
        assert caught.value.__cause__ is None or "S3cretPw" not in str(caught.value.__cause__)

    def test_a_valid_url_is_kept(self) -> None:
        """The file's URL wins over the variable's, as before."""
        config = default_config()
        config["shared_state"] = {"redis_url": "rediss://:pw@redis.internal:6380/2"}
        settings = settings_from(config, {"ROUTESVC_REDIS_URL": "redis://other:6379/0"})
        assert settings.redis_url == "rediss://:pw@redis.internal:6380/2"
