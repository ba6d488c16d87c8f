"""Encoding speed of the local encoders on real prompts (one core, batches of 64).

.venv/bin/python bench/encoders.py --data ../shared/data/routing --limit 2000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from routesvc.encoders import Encoder, HashingEncoder, WordLlamaEncoder
from routesvc.outcomes import read_outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description="Encoding speed of the local encoders.")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/routing"))
    parser.add_argument("--limit", type=int, default=2000)
    args = parser.parse_args()
    records = read_outcomes(args.data)
    step = max(1, len(records) // args.limit)
    texts = [r.prompt for r in records[::step]][: args.limit]
    chars = sum(len(t) for t in texts) / len(texts)
    encoders: list[Encoder] = [WordLlamaEncoder(), HashingEncoder()]
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
