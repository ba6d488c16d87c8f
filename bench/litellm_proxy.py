"""LiteLLM's proxy as a process in front of the fake provider, from its own virtualenv.

LiteLLM is never a dependency of routesvc: ``python -m bench.litellm_proxy --install`` creates
``${ROUTESVC_CACHE:-~/.cache/routesvc}/bench-venv`` and installs ``litellm[proxy]`` from PyPI
into it. The benchmarks start ``litellm --config ...`` from there with one model,
``gpt-4o-mini``, routed as ``openai/gpt-4o-mini`` to the fake provider.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from bench._harness import BENCH_KEY, clean_env, free_port, running

VENV = Path(os.environ.get("ROUTESVC_CACHE", Path.home() / ".cache" / "routesvc")) / "bench-venv"
LITELLM = VENV / "bin" / "litellm"


def litellm_available() -> str:
    """ "" when LiteLLM's proxy can be started, else why not."""
    if not LITELLM.exists():
        return f"{LITELLM} not found (run: python -m bench.litellm_proxy --install)"
    return ""


def litellm_version() -> str:
    """The installed LiteLLM version, or ""."""
    result = subprocess.run(  # noqa: S603 - the bench venv's own python
        [str(VENV / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip()


@contextlib.contextmanager
def litellm_proxy(fake_base: str) -> Iterator[tuple[str, int]]:
    """LiteLLM's proxy (one worker) routing gpt-4o-mini to the fake; yields its OpenAI base URL and pid."""
    port = free_port()
    config = {
        "model_list": [
            {
                "model_name": "gpt-4o-mini",
                "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": f"{fake_base}/v1", "api_key": "sk-bench"},
            }
        ],
        "litellm_settings": {"drop_params": True, "telemetry": False, "set_verbose": False},
        "general_settings": {"master_key": BENCH_KEY},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle)
        path = handle.name
    env = clean_env(LITELLM_LOG="ERROR", LITELLM_TELEMETRY="False", NO_DOCS="True")
    cmd = [str(LITELLM), "--config", path, "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    try:
        with running(cmd, port, env=env, timeout=180) as pid:
            yield f"http://127.0.0.1:{port}/v1", pid
    finally:
        os.unlink(path)


def install() -> None:
    """Create the bench virtualenv and install ``litellm[proxy]`` into it."""
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)  # noqa: S603 - fixed command
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)  # noqa: S603 - fixed command
    print(f"litellm {litellm_version()} in {VENV}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.litellm_proxy", description=__doc__)
    parser.add_argument("--install", action="store_true", help="create the venv and install litellm[proxy]")
    if parser.parse_args().install:
        install()
    else:
        print(litellm_available() or f"litellm {litellm_version()} at {LITELLM}")
