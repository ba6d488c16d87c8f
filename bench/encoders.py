"""Encoding speed of the local encoders on real prompts (one core, batches of 64).

.venv/bin/python -m bench.encoders --data ../shared/data/routing --limit 2000 [--minilm]

--minilm adds the MiniLM experiment (bench/minilm.py: numpy BERT forward pass, not cached).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from routesvc.config import limit_native_threads
from routesvc.encoders import Encoder, HashingEncoder, WordLlamaEncoder
from routesvc.outcomes import read_outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description="Encoding speed of the local encoders.")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/routing"))
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--minilm", action="store_true", help="also time bench/minilm.py's MiniLM-L6 encoder")
    args = parser.parse_args()
    limit_native_threads()  # one core
    records = read_outcomes(args.data)
    step = max(1, len(records) // args.limit)
    texts = [r.prompt for r in records[::step]][: args.limit]
    chars = sum(len(t) for t in texts) / len(texts)
    encoders: list[Encoder] = [WordLlamaEncoder(), HashingEncoder()]
    if args.minilm:
        from bench.minilm import MiniLMEncoder

        encoders.append(MiniLMEncoder())
    for encoder in encoders:
        encoder.encode(texts[:8])  # warm up
        started = time.perf_counter()
        for start in range(0, len(texts), 64):
            encoder.encode(texts[start : start + 64])
        elapsed = time.perf_counter() - started
        print(
            f"{encoder.name}: {elapsed / len(texts) * 1000:.3f} ms/prompt ({len(texts)} prompts, {chars:.0f} chars avg)"
        )
        started = time.perf_counter()
        for text in texts[:200]:
            encoder.encode([text])
        print(f"{encoder.name}: {(time.perf_counter() - started) / 200 * 1000:.3f} ms for one prompt at a time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
