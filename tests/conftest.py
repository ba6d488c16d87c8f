"""Shared fixtures: settings from YAML, a real in-process gRPC server on port 0, a client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sqlite3
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path

import grpc
import pytest
import structlog
import yaml

from routesvc.client import RouterClient, build_chat, direct_channel_options
from routesvc.config import DATA_DIR_ENV, Settings, parse_config
from routesvc.providers.base import HttpClientKind
from routesvc.server import Server
from routesvc.testing import FakeProvider
from routesvc.v1 import router_pb2 as pb

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "routing"


# The data dir of the whole run: a fresh one, never the user's (~/.local/share/routesvc holds the
# batch store of their own servers, whose jobs a test server would otherwise open and poll).
# Set at import, before any test or fixture resolves settings; removed when the run ends.
TEST_DATA_DIR = tempfile.mkdtemp(prefix="routesvc-test-data-")
os.environ[DATA_DIR_ENV] = TEST_DATA_DIR


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the run's data dir."""
    shutil.rmtree(TEST_DATA_DIR, ignore_errors=True)


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Every test starts with structlog's defaults (tests configure logging themselves)."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


def file_modes(folder: Path, pattern: str) -> dict[str, int]:
    """The permission bits of each file in ``folder`` matching ``pattern``, by name."""
    return {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.glob(pattern)}


@contextlib.contextmanager
def write_locked(path: Path) -> Iterator[None]:
    """Another process's exclusive write lock on the store file at ``path`` (created if absent),
    held for the block."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


def default_config() -> dict[str, object]:
    """The embedded default configuration as a mutable dict, for tests to adjust."""
    text = resources.files("routesvc").joinpath("default_config.yaml").read_text(encoding="utf-8")
    loaded = yaml.safe_load(text)
    assert isinstance(loaded, dict)
    return loaded


def add_local_model(config: dict[str, object], base_url: str, model_id: str, **fields: object) -> None:
    """An openai_compatible provider ``local`` at ``base_url`` (no key, as for Ollama or vLLM) and
    one cheap model of it, ``model_id``, in ``config``."""
    config["providers"]["local"] = {"kind": "openai_compatible", "base_url": base_url}  # type: ignore[index]
    config["models"].append(  # type: ignore[attr-defined]
        {
            "id": model_id,
            "provider": "local",
            **fields,
            "input_price_per_mtok": "0.02",
            "output_price_per_mtok": "0.05",
            "context_window": 131072,
        }
    )


def settings_from(config: dict[str, object], environ: dict[str, str] | None = None) -> Settings:
    """Validated settings from a config dict and an explicit environment (plus the run's data dir,
    unless it names one)."""
    return parse_config(yaml.safe_dump(config), "<test>", {DATA_DIR_ENV: TEST_DATA_DIR, **(environ or {})})


@pytest.fixture
def settings() -> Settings:
    """The embedded default policy with no provider keys."""
    return settings_from(default_config())


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[Server]:
    """A real grpc.aio server on a free loopback port."""
    async with Server(settings, port=0) as running:
        yield running


@pytest.fixture
async def client(server: Server) -> AsyncIterator[RouterClient]:
    """A client connected to ``server``."""
    async with RouterClient(server.target) as connected:
        yield connected


def user_chat(prompt: str, **kwargs: object) -> pb.ChatRequest:
    """A one-message chat request."""
    return build_chat([("user", prompt)], **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    """The fake OpenAI/Anthropic server on a free loopback port."""
    async with FakeProvider() as running:
        yield running


@pytest.fixture(params=["aiohttp", "httpx"])
def http_client(request: pytest.FixtureRequest) -> HttpClientKind:
    """Every adapter test runs over both SDK transports: they must behave the same."""
    kind: HttpClientKind = request.param
    return kind


def keyless_environ() -> dict[str, str]:
    """An environment with no keys, URLs or routesvc variables but the run's data dir (an empty
    one fell back to ~/.local/share/routesvc: a machine's own batch store then joined the test)."""
    return {DATA_DIR_ENV: TEST_DATA_DIR}


def process_environ() -> dict[str, str]:
    """This process's environment without the SDK and routesvc variables: for a ``routesvc`` or
    fake-provider process whose keys, URLs and config the test sets itself; but the run's data dir."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_", "ROUTESVC_"))}
    return {**kept, DATA_DIR_ENV: TEST_DATA_DIR}


def live_environ(fake: FakeProvider) -> dict[str, str]:
    """The SDK variables pointing both providers at ``fake``."""
    return {
        "OPENAI_API_KEY": "sk-test-openai",
        "OPENAI_BASE_URL": fake.openai_base_url,
        "ANTHROPIC_API_KEY": "sk-test-anthropic",
        "ANTHROPIC_BASE_URL": fake.anthropic_base_url,
    }


@pytest.fixture
async def live_server(fake: FakeProvider) -> AsyncIterator[Server]:
    """The default policy served with both providers pointed at the fake provider."""
    async with Server(settings_from(default_config(), live_environ(fake)), port=0) as running:
        yield running


@pytest.fixture
async def live_client(live_server: Server) -> AsyncIterator[RouterClient]:
    """A client of ``live_server``."""
    async with RouterClient(live_server.target) as connected:
        yield connected


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], object]]:
    """Async tests run on the loop ``routesvc serve`` runs on by default (``server.uvloop``):
    uvloop's where it is installed; ``ROUTESVC_TEST_LOOP=asyncio`` runs them on asyncio's instead."""
    if os.environ.get("ROUTESVC_TEST_LOOP") != "asyncio":
        try:
            import uvloop
        except ImportError:  # Windows: no uvloop, as for `routesvc serve`
            pass
        else:
            return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


def free_port() -> int:
    """A loopback TCP port nothing listens on now (bound once and released): for a server to
    take, or for a client to find closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    """A loopback port whose TCP handshake never completes: it listens, but its accept queue
    (one connection: backlog 0) is full and never accepted, so the kernel drops every further SYN
    and a connect waits until its caller gives up. A provider there never gets a byte."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(2):  # the first fills the queue; the second is left waiting, as ours will be
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        yield port


async def until(predicate: Callable[[], bool], cap: float = 10.0) -> None:
    """Wait until ``predicate()`` holds (breaker states, ledgers, captured logs, the fake's
    records: plain attributes, polled); a generous cap, so that a loaded machine is only slower."""
    async with asyncio.timeout(cap):
        while not predicate():  # noqa: ASYNC110 - plain attributes, polled
            await asyncio.sleep(0.02)


ChannelOptions = Sequence[tuple[str, str | int]]


def loopback_channel(target: str, options: ChannelOptions = (), **kwargs: object) -> grpc.aio.Channel:
    """A plaintext grpc.aio channel to a server of this host, as ``RouterClient`` opens one: off
    any proxy the environment names (``direct_channel_options``; gRPC would tunnel even a loopback
    call through ``grpc_proxy`` / ``http_proxy``). ``options`` and ``kwargs`` as
    ``grpc.aio.insecure_channel`` takes them."""
    return grpc.aio.insecure_channel(target, options=[*direct_channel_options(target), *options], **kwargs)


def loopback_sync_channel(target: str, options: ChannelOptions = ()) -> grpc.Channel:
    """``loopback_channel``, blocking (``grpc.insecure_channel``)."""
    return grpc.insecure_channel(target, options=[*direct_channel_options(target), *options])
