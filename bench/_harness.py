"""What every benchmark shares: processes under test, load from another process, stats, results.

Servers under test run as their own processes (``routesvc serve``, the bare server, the fake
provider, LiteLLM's proxy); load comes from a separate ``multiprocessing`` process with its own
event loop, so the load generator never shares an interpreter with what it measures. Every run
is bounded in requests and seconds, and talks to loopback only.
"""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PYTHON = sys.executable
# The key every bench client sends; LiteLLM's proxy refuses to start without a strong master key.
BENCH_KEY = "sk-bench-7c1e4f0a9b2d4e6f8a1c3e5b7d9f0a2c4e6b8d0f1a3c5e7b"

# A fixed mix of prompts: short questions, a medium instruction, a long document, and hints
# that exercise several rules. The same list feeds every target in every scenario.
_LOREM = (
    "The quarterly report covers revenue, churn, hiring and the migration of the billing system. "
    "Each section lists what changed, why it changed and what the team expects next quarter. "
)
PROMPTS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", ""),
    ("Write a Python function that merges two sorted lists.", "code_generation"),
    ("Summarise this report in three bullet points:\n" + _LOREM * 20, ""),
    ("Plan a three-day trip to Lisbon with a budget of 800 euros.", "multi_step_reasoning"),
    ("Write a short poem about the sea at night.", "creative_writing"),
    ("Translate 'good morning, how are you?' into Spanish and German.", ""),
    ("Explain the difference between TCP and UDP to a new engineer. " * 3, ""),
    ("Extract every date from: the meeting moved from 3 March to 12 April, then 1 May.", ""),
)


def free_port() -> int:
    """A free loopback TCP port (closed again at once; good enough on a quiet loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a process under test: no OTel or SDK variables leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OPENAI_", "ANTHROPIC_", "ROUTESVC_"))}
    env.update(extra)
    return env


def wait_for_port(port: int, timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something accepts on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


@contextlib.contextmanager
def running(
    cmd: Sequence[str], port: int, *, env: dict[str, str] | None = None, timeout: float = 60.0, cwd: Path = REPO
) -> Iterator[int]:
    """Run ``cmd`` until the block ends (SIGTERM, then SIGKILL after 10 s); yields its pid."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below, after the process
    process = subprocess.Popen(  # noqa: S603 - our own benchmark processes
        list(cmd), env=env or clean_env(), stdout=subprocess.DEVNULL, stderr=log, cwd=cwd
    )
    try:
        try:
            wait_for_port(port, timeout, process)
        except Exception:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        yield process.pid
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@contextlib.contextmanager
def fake_provider(chunk_count: int = 20, chunk_delay: float = 0.0, first_chunk_delay: float = 0.0) -> Iterator[str]:
    """``python -m routesvc.testing`` as a process, every request answered by one default script."""
    port = free_port()
    with running([PYTHON, "-m", "routesvc.testing", "--port", str(port)], port):
        base = f"http://127.0.0.1:{port}"
        script = {"chunk_count": chunk_count, "chunk_delay": chunk_delay, "first_chunk_delay": first_chunk_delay}
        body = json.dumps({"script": script, "mode": "default"}).encode()
        request = urllib.request.Request(f"{base}/_fake/script", data=body, method="POST")  # noqa: S310 - loopback
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
            answer.read()
        yield base


def routesvc_config(fake_base: str | None = None, **server: object) -> dict[str, Any]:
    """The embedded default config, logging JSON lines, with ``server`` fields overridden."""
    from importlib import resources

    text = resources.files("routesvc").joinpath("default_config.yaml").read_text(encoding="utf-8")
    config: dict[str, Any] = yaml.safe_load(text)
    config["logging"] = {"level": "info", "format": "json"}
    config["server"].update(server)
    return config


def policy_config(kind: str, folder: Path) -> dict[str, Any]:
    """The default config with another policy: ``default`` (as shipped), ``rules`` (the rules
    stage alone), or ``embedding`` (the rules, then an embedding stage fitted into ``folder``
    from the shared routerbench outcomes with WordLlama; needs /work/shared/data/routing)."""
    config = routesvc_config()
    stages = config["routing"]["stages"]
    rules = [stage for stage in stages if stage["kind"] == "rules"]
    if kind == "rules":
        config["routing"]["stages"] = rules
    elif kind == "embedding":
        if not (folder / "router.json").exists():
            _fit_router(folder)
        embedding = {"kind": "embedding", "router": str(folder), "strong_model": "gpt-4o", "weak_model": "gpt-4o-mini"}
        config["routing"]["stages"] = [*rules, embedding]
    elif kind != "default":
        raise ValueError(f"unknown policy {kind!r}: default, rules or embedding")
    return config


def _fit_router(folder: Path) -> None:
    from routesvc.config import limit_native_threads

    limit_native_threads()
    from routesvc.encoders import WordLlamaEncoder
    from routesvc.fitting import FitSettings, fit_router
    from routesvc.outcomes import read_outcomes

    shared = next(p for p in (REPO.parent / "shared", Path("/work/shared")) if p.exists())
    records = read_outcomes(shared / "data" / "routing" / "routerbench_train.jsonl")[:5000]
    router = fit_router(records, "gpt-4-1106-preview", "mistralai/mistral-7b-chat", WordLlamaEncoder(), FitSettings())
    router.save(folder)


def provider_environ(fake_base: str | None) -> dict[str, str]:
    """The SDK variables of a routesvc under test: bench keys, and both providers at the fake."""
    environ = {"OPENAI_API_KEY": "sk-bench", "ANTHROPIC_API_KEY": "sk-bench"}
    if fake_base:
        environ |= {"OPENAI_BASE_URL": f"{fake_base}/v1", "ANTHROPIC_BASE_URL": fake_base}
    return environ


@contextlib.contextmanager
def routesvc_server(
    config: dict[str, Any], fake_base: str | None = None, code: Path | None = None
) -> Iterator[tuple[str, int]]:
    """``routesvc serve`` as a process with ``config`` (from the source tree ``code``, default this
    checkout, to compare two versions side by side); yields its target and pid."""
    port = free_port()
    extra = provider_environ(fake_base)
    if code is not None:
        extra["PYTHONPATH"] = str(code)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle)
        path = handle.name
    try:
        cmd = [PYTHON, "-m", "routesvc", "serve", "--config", path, "--port", str(port)]
        with running(cmd, port, env=clean_env(**extra), cwd=code or REPO) as pid:
            yield f"127.0.0.1:{port}", pid
    finally:
        os.unlink(path)


@contextlib.contextmanager
def bare_server(*flags: str) -> Iterator[tuple[str, int]]:
    """``python -m bench.bare_server [FLAGS]`` as a process; yields its target and pid."""
    port = free_port()
    cmd = [PYTHON, "-m", "bench.bare_server", "--port", str(port), *flags]
    with running(cmd, port) as pid:
        yield f"127.0.0.1:{port}", pid


CACHE = Path(os.environ.get("ROUTESVC_CACHE") or Path.home() / ".cache" / "routesvc")


def go_load_binary() -> Path:
    """``bench/goload`` built into the cache (Go's build cache makes a rebuild of unchanged code
    take about a second); the module and build caches are the ones ``.ci/clients.sh`` uses."""
    binary = CACHE / "bin" / "routesvc-goload"
    env = clean_env(
        GOMODCACHE=str(CACHE / "go" / "mod"),
        GOCACHE=str(CACHE / "go" / "build"),
        GOTOOLCHAIN="local",
        GOSUMDB="off",
        GOFLAGS="-mod=mod",
    )
    subprocess.run(  # noqa: S603 - our own Go program
        ["go", "build", "-o", str(binary), "."],  # noqa: S607 - go from PATH, as .ci/clients.sh runs it
        cwd=REPO / "bench" / "goload",
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    return binary


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of ``pid`` and its child processes (workers), in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            # fields[1] is the parent pid; fields[11], fields[12] are utime and stime in ticks.
            if int(entry.name) == pid or int(fields[1]) == pid:
                total += (int(fields[11]) + int(fields[12])) / tick
    return total


def in_subprocess(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a fresh (spawned) process: the load generator. Returns its result."""
    return in_subprocesses(function, [args])[0]


def in_subprocesses(function: Callable[..., Any], argsets: Sequence[tuple[Any, ...]]) -> list[Any]:
    """``function(*args)`` for each of ``argsets``, each in its own spawned process, all at once."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(len(argsets)) as pool:
        return list(pool.starmap(function, argsets))


class GcPauses:
    """Every garbage collection of this process while inside the ``with`` block, as (generation,
    seconds): a pause here is a wait for everything the process runs at that moment."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._started: float | None = None

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:  # not a collection already running when the block began
            self.pauses.append((info["generation"], time.perf_counter() - self._started))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._on_gc)

    @property
    def longest(self) -> float:
        """The longest pause, in seconds (0 if none)."""
        return max((seconds for _, seconds in self.pauses), default=0.0)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    """p50, p99 and mean of seconds, in milliseconds."""
    return {
        "p50_ms": round(percentile(values, 50) * 1000, 3),
        "p99_ms": round(percentile(values, 99) * 1000, 3),
        "mean_ms": round(statistics.fmean(values) * 1000, 3) if values else float("nan"),
    }


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_at_start": os.getloadavg(),
    }


def write_results(name: str, data: dict[str, Any]) -> Path:
    """``bench/results/NAME.json`` with the machine and the time, pretty-printed."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine()}
    payload.update(data)
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain fixed-width table on stdout."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(value.rjust(width) for value, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)
