"""Benchmark: estimate() over N in-memory prompt rows (~20 words each); prints rows/s.

Run: /work/venv/bin/python tests/perf/bench_estimate.py [N]   (default 1,000,000)
Target (issue): 1,000,000 rows in well under 60 s on the project's 2-core machine.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Iterator

from batcher.estimate import estimate
from batcher.types import RequestContext, RequestRow

WORDS = "the quick brown fox jumps over lazy dog classify this review as positive or negative \
sentiment product arrived late but works great customer support was helpful néanmoins 价格 合理 🙂"
WORDS_LIST = WORDS.split()


def rows(n: int, seed: int = 1) -> Iterator[RequestRow]:
    rng = random.Random(seed)
    for i in range(n):
        yield RequestRow(id=str(i), shape="prompt", source="bench", line=i + 1,
                         prompt=" ".join(rng.choices(WORDS_LIST, k=20)),
                         model="claude-3-5-haiku" if i % 10 == 0 else None)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    ctx = RequestContext(base_url="http://127.0.0.1:1/v1", model="gpt-4o-mini",
                         system="You are a careful annotator. Answer with one word.",
                         params={"max_tokens": 5})
    # Rows are streamed, as the readers do: generating them costs time of its own, measured
    # apart and subtracted (keeping 1 M rows in a list would instead measure the GC).
    started = time.perf_counter()
    for _ in rows(n):
        pass
    generation = time.perf_counter() - started
    started = time.perf_counter()
    report = estimate(rows(n), ctx, "chat", rpm=10_000, tpm=2_000_000, concurrency=64)
    total = time.perf_counter() - started
    print(report.render())
    own = total - generation
    print(f"\n{n:,} rows: {total:.2f} s with row generation, {generation:.2f} s generating "
          f"alone -> estimate {own:.2f} s = {n / own:,.0f} rows/s (tokens + prices)")

if __name__ == "__main__":
    main()
