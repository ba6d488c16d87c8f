"""Authentication and authorization (RELIABILITY 16 and 21): keys map to tenants, routing follows
the authenticated tenant, health needs no key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.testing import capture_logs

from routesvc.auth import Authenticator, key_digest
from routesvc.client import RouterClient
from routesvc.errors import ConfigError
from routesvc.server import Server
from routesvc.testing import FakeProvider
from routesvc.v1 import router_pb2 as pb
from tests.conftest import default_config, live_environ, loopback_channel, settings_from, user_chat
from tests.test_validation import error_info

ACME_KEY = "acme-key-canary-0001"
GLOBEX_KEY = "globex-key-0002"
REVOKED_KEY = "revoked-key-0003"
_JSON_OBJECT = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT)


def auth_config() -> dict[str, object]:
    """Two tenants: acme may use only gpt-4o-mini and is premium by default; globex may use all."""
    config = default_config()
    config["auth"] = {"enabled": True}
    config["tenants"] = {
        "acme": {"api_key_sha256": [key_digest(ACME_KEY)], "allowed_models": ["gpt-4o-mini"], "user_tier": "premium"},
        "globex": {"api_key_sha256": [key_digest(GLOBEX_KEY)]},
    }
    return config


@pytest.fixture
async def secured(fake: FakeProvider) -> AsyncIterator[Server]:
    """A server with authentication on."""
    async with Server(settings_from(auth_config(), live_environ(fake)), port=0) as server:
        yield server


async def route_as(server: Server, key: str | None, **context: object) -> pb.RouteDecision:
    async with RouterClient(server.target, api_key=key) as client:
        return await client.route(user_chat("hello"), pb.RoutingContext(**context))  # type: ignore[arg-type]


class TestAuthentication:
    @pytest.mark.parametrize("key", [None, "wrong-key", REVOKED_KEY], ids=["no key", "wrong key", "revoked key"])
    async def test_calls_without_a_valid_key_are_unauthenticated(self, secured: Server, key: str | None) -> None:
        """No key, an unknown key and a revoked key are UNAUTHENTICATED, never echoing the key."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await route_as(secured, key)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(caught.value).reason == "UNAUTHENTICATED"
        assert key is None or key not in (caught.value.details() or "")

    async def test_a_malformed_authorization_header_is_unauthenticated(self, secured: Server) -> None:
        """'authorization: Basic ...' is not a bearer key."""
        async with RouterClient(secured.target) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.route(user_chat("hi"), metadata={"authorization": f"Basic {ACME_KEY}"})
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    async def test_health_and_model_listing_follow_the_rules(self, secured: Server) -> None:
        """Health answers without a key; the service itself does not."""
        async with loopback_channel(secured.target) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        async with RouterClient(secured.target) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.list_models()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


class TestAuthorization:
    async def test_routing_follows_the_authenticated_tenant(self, secured: Server) -> None:
        """acme's default tier (premium) would pick gpt-4o, but acme may only use gpt-4o-mini."""
        decision = await route_as(secured, ACME_KEY)
        assert decision.model == "gpt-4o-mini"
        assert any(
            "premium_tier" in reason and "not allowed for tenant 'acme'" in reason for reason in decision.reasons
        )
        globex = await route_as(secured, GLOBEX_KEY, user_tier="premium")
        assert globex.model == "gpt-4o"

    async def test_with_auth_off_a_named_tenant_gets_its_configured_tier(self) -> None:
        """With auth off the named tenant is taken as given, its default tier included (as its
        allow-list is): globex, premium by default here, routes as premium unless the request
        names a tier; an unnamed or unknown tenant gets none (the tier was ignored)."""
        config = auth_config()
        config["auth"] = {"enabled": False}
        config["tenants"]["globex"]["user_tier"] = "premium"  # type: ignore[index]
        async with Server(settings_from(config), port=0) as server:
            named = await route_as(server, None, tenant="globex")
            standard = await route_as(server, None, tenant="globex", user_tier="standard")
            unknown = await route_as(server, None, tenant="initech")
        assert (named.model, standard.model, unknown.model) == ("gpt-4o", "gpt-4o-mini", "gpt-4o-mini")
        assert any("premium_tier" in reason and "chosen" in reason for reason in named.reasons)

    async def test_a_model_outside_the_allow_list_is_permission_denied(self, secured: Server) -> None:
        """acme pinning gpt-4o is PERMISSION_DENIED."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await route_as(secured, ACME_KEY, model="gpt-4o")
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

    @pytest.mark.parametrize(
        ("model", "chat"),
        [
            ("claude-sonnet", user_chat("hello as json", response_format=_JSON_OBJECT)),
            ("gpt-4o", user_chat("word " * 130_000)),
            ("gpt-4o", user_chat("hello", max_output_tokens=20_000)),
        ],
        ids=["no json mode", "context window", "max output tokens"],
    )
    async def test_a_pinned_model_outside_the_allow_list_is_permission_denied_whatever_else_keeps_it_out(
        self, secured: Server, model: str, chat: pb.ChatRequest
    ) -> None:
        """acme pinning a model it may not use, in a request that model could not serve anyway
        (JSON object mode on claude-sonnet, a prompt past gpt-4o's window, more output than it
        writes): PERMISSION_DENIED naming the allow-list, and nothing about the model (it was
        FAILED_PRECONDITION or RESOURCE_EXHAUSTED describing the model, by the prompt)."""
        async with RouterClient(secured.target, api_key=ACME_KEY) as client:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.route(chat, pb.RoutingContext(model=model))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert caught.value.details() == f"model {model} is not allowed for tenant 'acme'"

    async def test_an_unknown_pinned_model_lists_only_the_models_the_tenant_may_use(self, secured: Server) -> None:
        """acme (allowed only gpt-4o-mini) pinning an unknown model is NOT_FOUND naming only
        gpt-4o-mini, not the catalog; globex, with no allow-list, is told the whole catalog."""
        details = {}
        for key in (ACME_KEY, GLOBEX_KEY):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await route_as(secured, key, model="gpt-5-secret")
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            details[key] = caught.value.details()
        assert details == {
            ACME_KEY: "unknown model 'gpt-5-secret'; tenant 'acme' may use: gpt-4o-mini",
            GLOBEX_KEY: "unknown model 'gpt-5-secret'; known models: gpt-4o-mini, gpt-4o, claude-sonnet",
        }

    async def test_model_listing_marks_the_models_outside_the_allow_list_unavailable(self, secured: Server) -> None:
        """ListModels as acme lists the whole catalog (as the proto says), the models it may not use
        unavailable and saying why; as globex, every model is available."""
        listed = {}
        for key in (ACME_KEY, GLOBEX_KEY):
            async with RouterClient(secured.target, api_key=key) as client:
                listed[key] = [(m.id, m.available, m.unavailable_reason) for m in await client.list_models()]
        assert listed == {
            ACME_KEY: [
                ("gpt-4o-mini", True, ""),
                ("gpt-4o", False, "not allowed for tenant 'acme'"),
                ("claude-sonnet", False, "not allowed for tenant 'acme'"),
            ],
            GLOBEX_KEY: [("gpt-4o-mini", True, ""), ("gpt-4o", True, ""), ("claude-sonnet", True, "")],
        }

    async def test_a_spoofed_tenant_is_permission_denied(self, secured: Server) -> None:
        """acme's key claiming to be globex is PERMISSION_DENIED; a header claiming it changes nothing."""
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await route_as(secured, ACME_KEY, tenant="globex")
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        async with RouterClient(secured.target, api_key=ACME_KEY) as client:
            decision = await client.route(user_chat("hi"), metadata={"x-tenant": "globex"})
        assert decision.model == "gpt-4o-mini"

    async def test_the_client_key_is_never_forwarded_upstream(self, secured: Server, fake: FakeProvider) -> None:
        """The provider sees the service's key; the tenant's key appears in no upstream header."""
        async with RouterClient(secured.target, api_key=GLOBEX_KEY) as client:
            async for _ in client.complete(user_chat("hi")):
                pass
        assert all(GLOBEX_KEY not in str(request.headers) for request in fake.requests)
        assert fake.requests[-1].api_key == "sk-test-openai"


class TestProviderKeysShownToTenants:
    async def test_a_tenant_is_told_which_provider_lacks_a_key_but_not_where_the_operator_keeps_it(
        self, tmp_path: Path
    ) -> None:
        """ListModels, a Route decision's reasons and a Complete's error name the provider, the
        environment variable and "its api_key_file", never the file's path (where the operator
        keeps secrets); the ``provider_unconfigured`` log at start names the path."""
        secrets = tmp_path / "run-secrets-canary"
        secrets.mkdir()
        (secrets / "anthropic-key").write_text("sk-ant with a space\n")
        config = auth_config()
        config["providers"]["openai"]["api_key_file"] = str(secrets / "openai-key")  # type: ignore[index]
        config["providers"]["anthropic"]["api_key_file"] = str(secrets / "anthropic-key")  # type: ignore[index]
        with capture_logs() as logs:
            async with (
                Server(settings_from(config), port=0) as server,
                RouterClient(server.target, api_key=GLOBEX_KEY) as client,
            ):
                models = await client.list_models()
                openai = await client.route(user_chat("hi"))
                anthropic = await client.route(user_chat("hi"), pb.RoutingContext(model="claude-sonnet"))
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    [m async for m in client.complete(user_chat("hi"), pb.RoutingContext(model="claude-sonnet"))]
        shown = [m.unavailable_reason for m in models] + [*openai.reasons, *anthropic.reasons, caught.value.details()]
        assert "run-secrets-canary" not in str(shown)
        assert all("its api_key_file" in str(said) for said in (openai.reasons, anthropic.reasons, shown[-1]))
        no_key = "provider 'openai' has no API key configured: set environment variable OPENAI_API_KEY or {}"
        spaces = (
            "provider 'anthropic': the API key in {} has spaces or control characters, "
            "which an HTTP header cannot carry"
        )
        assert {m.id: m.unavailable_reason for m in models} == {
            "gpt-4o-mini": no_key.format("its api_key_file"),
            "gpt-4o": no_key.format("its api_key_file"),
            "claude-sonnet": spaces.format("its api_key_file"),
        }
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        logged = {entry["provider"]: entry["reason"] for entry in logs if entry["event"] == "provider_unconfigured"}
        assert logged == {
            "openai": no_key.format(f"file {secrets / 'openai-key'}"),
            "anthropic": spaces.format(f"file {secrets / 'anthropic-key'}"),
        }


class TestKeysFiles:
    def test_a_line_that_is_not_a_digest_fails_the_start_naming_its_line(self, tmp_path: Path) -> None:
        """A raw key pasted into a keys file (a digest belongs there) is a ConfigError naming the
        field and the line, which never quotes the line."""
        keys = tmp_path / "acme.keys"
        keys.write_text(f"{key_digest(ACME_KEY)}\n\n{GLOBEX_KEY}\n")
        config = auth_config()
        config["tenants"]["acme"] = {"api_keys_file": str(keys)}  # type: ignore[index]
        with pytest.raises(ConfigError) as caught:
            Authenticator(settings_from(config).config)
        assert caught.value.message.startswith("tenants.acme.api_keys_file: line 3 of ")
        assert GLOBEX_KEY not in caught.value.message

    def test_a_key_of_another_tenant_fails_the_start_naming_both(self, tmp_path: Path) -> None:
        """A keys file holding the digest of another tenant's key is a ConfigError naming the line
        and that tenant: the key authenticated as whichever tenant came first, silently."""
        keys = tmp_path / "globex.keys"
        keys.write_text(f"{key_digest(REVOKED_KEY)}\n{key_digest(ACME_KEY)}\n")
        config = auth_config()
        config["tenants"]["globex"] = {"api_keys_file": str(keys)}  # type: ignore[index]
        with pytest.raises(ConfigError) as caught:
            Authenticator(settings_from(config).config)
        assert caught.value.message == (
            f"tenants.globex.api_keys_file: line 2 of {keys}: the same key digest as tenants.acme.api_key_sha256[0],"
            " a key of tenant 'acme'; a key belongs to one tenant"
        )

    async def test_a_reload_giving_a_key_to_a_second_tenant_changes_nothing(
        self, secured: Server, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """A reload whose keys file gives acme globex's key too is refused: globex's key still
        authenticates globex (it would have authenticated acme, the first tenant)."""
        keys = tmp_path / "acme.keys"
        keys.write_text(f"{key_digest(GLOBEX_KEY)}\n")
        config = auth_config()
        config["tenants"]["acme"]["api_keys_file"] = str(keys)  # type: ignore[index]
        with pytest.raises(ConfigError) as caught:
            await secured.reload(settings_from(config, live_environ(fake)))
        assert caught.value.message == (
            f"tenants.globex.api_key_sha256[0]: the same key digest as tenants.acme.api_keys_file: line 1 of {keys},"
            " a key of tenant 'acme'; a key belongs to one tenant"
        )
        assert (await route_as(secured, GLOBEX_KEY, tenant="globex")).model == "gpt-4o-mini"

    async def test_a_reload_with_a_bad_keys_file_changes_nothing(
        self, secured: Server, fake: FakeProvider, tmp_path: Path
    ) -> None:
        """A reload that would revoke acme's key, change the default model and cap acme at one
        request a minute, but whose keys file holds a raw key, is refused whole: acme's key still
        works, on the old policy and with no new limit."""
        keys = tmp_path / "acme.keys"
        keys.write_text("not-a-digest\n")
        config = auth_config()
        config["routing"]["default_model"] = "gpt-4o"  # type: ignore[index]
        config["tenants"]["acme"] = {"api_keys_file": str(keys), "requests_per_minute": 1}  # type: ignore[index]
        with pytest.raises(ConfigError):
            await secured.reload(settings_from(config, live_environ(fake)))
        assert (await route_as(secured, GLOBEX_KEY)).model == "gpt-4o-mini"
        async with RouterClient(secured.target, api_key=ACME_KEY) as client:
            for _ in range(3):
                messages = [m async for m in client.complete(user_chat("hello"))]
                assert messages[-1].WhichOneof("event") == "completion"
