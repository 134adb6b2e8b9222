"""Generate the product-review sentiment example data (deterministic; rerun to regenerate).

Raw records ({product, review, sentiment}) that the config's Jinja template turns into
"classify the sentiment" instructions: the instruction-from-raw-records case of the seed articles.

    python src/tunelab/examples/reviews/make_reviews.py
"""

import json
import random
from pathlib import Path

PRODUCTS = ["headphones", "coffee grinder", "running shoes", "desk lamp", "backpack", "phone case", "blender",
            "e-reader", "water bottle", "office chair", "rain jacket", "keyboard", "tent", "toaster", "monitor"]
GOOD = ["works perfectly", "is well made", "exceeded my expectations", "is worth every penny", "feels sturdy",
        "arrived quickly", "is easy to use", "looks great", "is very comfortable", "has excellent battery life"]
BAD = ["broke after a week", "is poorly made", "was a waste of money", "stopped working", "feels flimsy",
       "arrived damaged", "is hard to use", "looks cheap", "is uncomfortable", "has terrible battery life"]
OPENERS = ["Honestly,", "After a month of use,", "I have to say", "Overall,", "To be fair,", "In short,", ""]


def review(rng: random.Random, sentiment: str, product: str) -> str:
    opener = rng.choice(OPENERS)
    if sentiment == "positive":
        a, b = rng.sample(GOOD, 2)
        text = f"this {product} {a} and {b}."
    elif sentiment == "negative":
        a, b = rng.sample(BAD, 2)
        text = f"this {product} {a} and {b}."
    else:
        text = f"this {product} {rng.choice(GOOD)}, but it {rng.choice(BAD)}."
    text = f"{opener} {text}".strip()
    return text[0].upper() + text[1:]


def records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sentiment = rng.choice(["positive", "negative", "mixed"])
        product = rng.choice(PRODUCTS)
        out.append({"product": product, "review": review(rng, sentiment, product), "sentiment": sentiment})
    return out


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    here = Path(__file__).parent
    write(here / "train.jsonl", records(320, seed=1))
    write(here / "eval.jsonl", records(40, seed=2))
