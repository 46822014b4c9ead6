"""Writes examples/reviews.parquet, the input of jobs/classify_reviews.toml (deterministic).

Usage: python examples/make_reviews.py [OUTPUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REVIEWS: list[tuple[str, str, int]] = [
    ("kettle", "Boils a full litre in under three minutes and switches off reliably.", 5),
    ("kettle", "The lid broke after two weeks and the handle gets hot.", 1),
    ("kettle", "Does what a kettle does. Nothing special.", 3),
    ("headphones", "Great sound and the battery lasts all week.", 5),
    ("headphones", "Uncomfortable after an hour, and the left ear crackles.", 2),
    ("headphones", "Fine for calls, a bit thin for music.", 3),
    ("backpack", "Survived a month of daily commuting in the rain without a leak.", 5),
    ("backpack", "The zip jammed on the first day. Returned it.", 1),
    ("backpack", "Plenty of pockets. Straps could be wider.", 4),
    ("desk lamp", "Bright, adjustable and the warm setting is lovely in the evening.", 5),
    ("desk lamp", "Flickers constantly at the lowest brightness.", 2),
    ("desk lamp", "It is a lamp. It gives light.", 3),
    ("coffee grinder", "Consistent grind, easy to clean, quieter than my old one.", 5),
    ("coffee grinder", "Stopped working after a month and support never replied.", 1),
    ("coffee grinder", "Grinds well but leaves a fine dust all over the counter.", 3),
    ("running shoes", "Light and cushioned; my knees are grateful.", 5),
    ("running shoes", "The sole started peeling off after 100 km.", 2),
    ("running shoes", "Runs half a size small, otherwise okay.", 3),
    ("board game", "Our family plays it every weekend now.", 5),
    ("board game", "Rules are confusing and two cards were missing.", 1),
    ("board game", "Fun the first few times, then it gets repetitive.", 3),
    ("phone case", "Dropped my phone down the stairs and not a scratch.", 5),
    ("phone case", "Yellowed within a month and now looks dirty.", 2),
    ("phone case", "Fits well. Buttons are a little stiff.", 4),
    ("water bottle", "Keeps water cold all day, even in the car.", 5),
    ("water bottle", "Leaks in my bag every single time.", 1),
    ("water bottle", "Holds water. The paint chipped a little.", 3),
    ("keyboard", "Lovely tactile keys and the backlight is even.", 5),
    ("keyboard", "Several keys double-type; unusable for work.", 1),
    ("keyboard", "Good value, but louder than I expected.", 4),
]


def reviews_table() -> pa.Table:
    """30 rows: review_id (int64, 1..30), product, review, stars (1-5)."""
    return pa.table({
        "review_id": pa.array(range(1, len(REVIEWS) + 1), type=pa.int64()),
        "product": [product for product, _, _ in REVIEWS],
        "review": [review for _, review, _ in REVIEWS],
        "stars": pa.array([stars for _, _, stars in REVIEWS], type=pa.int64()),
    })


def main() -> None:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("reviews.parquet")
    pq.write_table(reviews_table(), target)
    print(f"wrote {len(REVIEWS)} rows to {target}")


if __name__ == "__main__":
    main()
