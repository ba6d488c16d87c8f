"""The command line for batch jobs and cascades, against real processes: `routesvc serve` with fast
batch timers, `complete --no-realtime`, `batch get`, `batch cancel`, `complete --cascade`; and
`batch` against a server with TLS and API keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from routesvc.auth import key_digest
from tests.conftest import REPO, default_config, process_environ
from tests.test_batches import UNKNOWN_BATCH_ID
from tests.test_tls import make_pki


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@contextmanager
def _serving(directory: Path, config: dict[str, object]) -> Iterator[str]:
    """The fake provider and `routesvc serve` with ``config`` (fast batch timers, the batch store in
    ``directory``) as processes; yields the server's target."""
    config["batch"] = {"group_window_seconds": 0.05, "poll_interval_seconds": 0.05}
    config_path = directory / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    base = process_environ()
    fake = _spawn(["-m", "routesvc.testing", "--port", "0"], base)
    server: subprocess.Popen[str] | None = None
    try:
        assert fake.stdout is not None
        fake_url = fake.stdout.readline().strip()
        env = {
            **base,
            "OPENAI_API_KEY": "sk-cli-test",
            "OPENAI_BASE_URL": f"{fake_url}/v1",
            "ANTHROPIC_API_KEY": "sk-cli-test",
            "ANTHROPIC_BASE_URL": fake_url,
            "ROUTESVC_DATA_DIR": str(directory / "data"),
        }
        server = _spawn(["-m", "routesvc", "serve", "--port", "0", "--config", str(config_path)], env)
        assert server.stdout is not None
        started = json.loads(server.stdout.readline())
        assert started["event"] == "server_started"
        yield started["target"]
    finally:
        for process in (server, fake):
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The default policy served in plaintext without auth."""
    with _serving(tmp_path_factory.mktemp("cli-batch"), default_config()) as serving:
        yield serving


@dataclass
class Secured:
    target: str
    pki: Path


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """The default policy served over TLS, with API keys: acme-key is tenant acme."""
    directory = tmp_path_factory.mktemp("cli-batch-tls")
    pki = make_pki(directory)
    config = default_config()
    config["server"] = {"tls": {"cert_file": str(pki / "server.pem"), "key_file": str(pki / "server.key")}}
    config["auth"] = {"enabled": True}
    config["tenants"] = {"acme": {"api_key_sha256": [key_digest("acme-key")]}}
    with _serving(directory, config) as serving:
        yield Secured(serving, pki)


def _cli(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ROUTESVC_TARGET": target}
    return subprocess.run(
        [sys.executable, "-m", "routesvc", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


class TestBatchCommands:
    """`complete --no-realtime` prints the job; `batch get` returns the answer once the provider is done."""

    def test_complete_no_realtime_then_batch_get(self, target: str) -> None:
        """The job id on stdout at once; `batch get --json` reaches succeeded with text and cost."""
        submitted = _cli(target, "complete", "--no-realtime", "--tenant", "acme", "Summarise this report")
        assert submitted.returncode == 0, submitted.stderr
        batch_id = submitted.stdout.strip()
        assert batch_id.startswith("batch_")
        assert f"'routesvc batch get {batch_id}' fetches the answer" in submitted.stderr
        # A target given by flag is in the command to run next (it was left out).
        flagged = subprocess.run(
            [sys.executable, "-m", "routesvc", "complete", "--target", target, "--no-realtime", "--tenant", "a", "x"],
            cwd=REPO,
            env={k: v for k, v in os.environ.items() if k != "ROUTESVC_TARGET"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert f"'routesvc batch get --target {target} {flagged.stdout.strip()}'" in flagged.stderr
        deadline = time.monotonic() + 20
        while True:
            got = _cli(target, "batch", "get", batch_id, "--tenant", "acme", "--json")
            assert got.returncode == 0, got.stderr
            answer = json.loads(got.stdout)
            if answer["state"] == "succeeded" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert answer["state"] == "succeeded"
        assert answer["text"]
        assert float(answer["cost_usd"]) > 0

    def test_batch_get_for_another_tenant_is_not_found(self, target: str) -> None:
        """Another tenant's job: exit 1, NOT_FOUND with reason BATCH_NOT_FOUND."""
        submitted = _cli(target, "complete", "--no-realtime", "--json", "--tenant", "acme", "Summarise")
        batch_id = json.loads(submitted.stdout.splitlines()[-1])["batch_id"]
        got = _cli(target, "batch", "get", batch_id, "--tenant", "globex")
        assert got.returncode == 1
        assert "NOT_FOUND" in got.stderr
        assert "[BATCH_NOT_FOUND]" in got.stderr

    def test_batch_cancel_of_an_ended_job_returns_it_unchanged(self, target: str) -> None:
        """Cancelling a job that already ended keeps its state."""
        submitted = _cli(target, "complete", "--no-realtime", "--json", "Summarise")
        batch_id = json.loads(submitted.stdout.splitlines()[-1])["batch_id"]
        deadline = time.monotonic() + 20
        while json.loads(_cli(target, "batch", "get", batch_id, "--json").stdout)["state"] != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        cancelled = _cli(target, "batch", "cancel", batch_id, "--json")
        assert json.loads(cancelled.stdout)["state"] == "succeeded"


class TestCascadeCommand:
    """`complete --cascade --json` shows the decision's cascade and the completion's attempts."""

    def test_cascade_json(self, target: str) -> None:
        """The fake's default answer is fine locally; the judge's non-JSON answer releases it as configured."""
        done = _cli(target, "complete", "--cascade", "--json", "What is the capital of France?")
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        assert lines[0]["type"] == "decision"
        assert lines[-1]["type"] == "completion"
        assert lines[-1]["model"] == "gpt-4o-mini"
        assert [a["outcome"] for a in lines[-1]["attempts"]] == ["ATTEMPT_OUTCOME_COMPLETED", "ATTEMPT_OUTCOME_JUDGE"]
        assert lines[-1]["quality"]["reason"] == "judge gave no score in [0, 1]; released as configured"


class TestBatchOverTls:
    """`batch get` and `batch cancel` connect like every other client command: --tls-ca and
    --api-key reach a TLS server that requires keys."""

    def test_get_and_cancel_use_the_tls_and_key_flags(self, secured: Secured) -> None:
        """A job submitted over TLS with acme's key is fetched and cancelled over TLS with the same
        flags (it used to be dialled in plaintext: UNAVAILABLE)."""
        flags = ("--tls-ca", str(secured.pki / "ca.pem"), "--api-key", "acme-key", "--timeout", "20")
        submitted = _cli(secured.target, "complete", "--no-realtime", "--json", *flags, "Summarise")
        assert submitted.returncode == 0, submitted.stderr
        batch_id = json.loads(submitted.stdout.splitlines()[-1])["batch_id"]
        got = _cli(secured.target, "batch", "get", batch_id, "--json", *flags)
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)["batch_id"] == batch_id
        cancelled = _cli(secured.target, "batch", "cancel", batch_id, "--json", *flags)
        assert cancelled.returncode == 0, cancelled.stderr
        assert json.loads(cancelled.stdout)["state"] in {"cancelled", "succeeded"}

    def test_the_key_is_sent(self, secured: Secured) -> None:
        """Over TLS without --api-key the service answers UNAUTHENTICATED, so the key flag is what
        authenticates `batch`; with it, another tenant's or an unknown job is BATCH_NOT_FOUND."""
        ca = ("--tls-ca", str(secured.pki / "ca.pem"))
        anonymous = _cli(secured.target, "batch", "get", UNKNOWN_BATCH_ID, *ca)
        assert anonymous.returncode == 1
        assert anonymous.stderr.startswith("error: UNAUTHENTICATED:")
        unknown = _cli(secured.target, "batch", "cancel", UNKNOWN_BATCH_ID, *ca, "--api-key", "acme-key")
        assert unknown.returncode == 1
        assert unknown.stderr.rstrip().endswith("[BATCH_NOT_FOUND]")


def test_data_dir_is_used(tmp_path: Path) -> None:
    """ROUTESVC_DATA_DIR places the batch store (the default store path is never in the checkout)."""
    from routesvc.config import load_settings

    settings = load_settings(environ={"ROUTESVC_DATA_DIR": str(tmp_path)})
    assert settings.batch_store_path == tmp_path / "batches.db"
