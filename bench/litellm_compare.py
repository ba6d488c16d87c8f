"""Against LiteLLM: the Complete scenario with LiteLLM's proxy as a third target, same run.

    .venv/bin/python -m bench.litellm_proxy --install     # once: LiteLLM in its own venv
    .venv/bin/python -m bench.litellm_compare [the options of bench.complete_overhead]

The fake provider, prompts, SDK, concurrency levels and load process are those of
``bench.complete_overhead``; LiteLLM's proxy (one worker) and routesvc (one process) each sit
in front of the same fake, and both are compared with calling it directly. Results go to
``bench/results/litellm_compare.json``.
"""

from __future__ import annotations

from bench.complete_overhead import run

if __name__ == "__main__":
    run(litellm_default=True, output="litellm_compare")
