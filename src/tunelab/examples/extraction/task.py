"""A structured-extraction task of our own making: a customer's order message in, one JSON object out.

Each example is a short message (an e-mail, a chat line, a note) asking for an order; the answer is the
JSON object ``{"customer", "city", "product", "quantity", "express", "day"}`` with the keys in that order:
the customer's full name, the delivery city, the product as named in the catalogue, the quantity as a
number (messages write it as a digit or a word), whether express delivery was asked for (several ways of
saying yes and no), and the delivery weekday. Scored field by field with the ``json_fields`` metric.

Every entity pool (first names, surnames, cities, products) is split into disjoint train and test parts,
and no test value is a word of a train value, so the held-out split measures extraction, not memory. The
messages come from several templates whose field order differs, so position is no shortcut. Rendered
examples are about 110-150 tokens (CPU training runs at ~150 tokens/s).

    python -m tunelab.examples.extraction.task     # regenerate train.jsonl / test.jsonl beside this file
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tunelab.examples.splits import write_jsonl_splits

HERE = Path(__file__).parent
FIELDS = ("customer", "city", "product", "quantity", "express", "day")
SYSTEM_PROMPT = ("Extract the order from the message as one JSON object with the keys customer, city, product, "
                 "quantity (a number), express (true or false) and day. Answer with the JSON only.")

FIRST = (["Anna", "Marco", "Sofia", "Lukas", "Elena", "Jonas", "Clara", "Mateo", "Ines", "Oskar", "Lena", "Pablo"],
         ["Greta", "Tomas", "Nadia", "Felix", "Irene", "Victor"])
LAST = (["Berg", "Rossi", "Novak", "Weber", "Costa", "Moreau", "Lind", "Silva", "Keller", "Russo", "Horvat", "Blom"],
        ["Sandoval", "Petrov", "Okafor", "Dubois", "Fischer", "Marino"])
CITIES = (["Lyon", "Munich", "Seville", "Turin", "Graz", "Porto", "Ghent", "Utrecht"],
          ["Krakow", "Bergen", "Malaga", "Basel"])
PRODUCTS = (["Desk Lamp", "Office Chair", "Coffee Grinder", "Rain Jacket", "Yoga Mat", "Tea Kettle", "Garden Hose",
             "Bike Helmet", "Picture Frame", "Bath Towel"],
            ["Camping Stove", "Wool Blanket", "Table Fan", "Travel Mug", "Bookshelf"])
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
EXPRESS = {True: ["by express delivery", "with express shipping", "as fast as possible (express, please)",
                  "urgently: I'll pay for express"],
           False: ["with standard shipping", "no rush, standard delivery is fine", "by regular post",
                   "with the free standard delivery"]}

TEMPLATES = [
    "Hello, this is {customer}. Please send {qty} {product_s} to {city} {express}. Delivery on {day} would be ideal.",
    "Order request: {qty} x {product}, deliver to {city} on {day}, {express}. Thanks, {customer}",
    "Hi! Could I get {qty} of the {product_s}? Ship {express} to my address in {city}. I'm home on {day}. - {customer}",
    "{customer} here from {city}. I'd like {qty} {product_s} {express}, arriving {day} if you can.",
    "Dear shop, for {day} I need {qty} {product_s} delivered in {city} {express}. Kind regards, {customer}.",
    "Quick one: {qty} {product_s} for {customer}, {city}. {express_cap}. {day} works best.",
]


def pools(split: str) -> dict[str, list[str]]:
    """The entity values of ``split`` ("train" or "test")."""
    part = 0 if split == "train" else 1
    return {"first": FIRST[part], "last": LAST[part], "city": CITIES[part], "product": PRODUCTS[part]}


def test_only_values() -> set[str]:
    """Every entity value that occurs only in the test split."""
    return {v for values in pools("test").values() for v in values}


def _plural(product: str, quantity: int) -> str:
    return product if quantity == 1 else product + ("es" if product.endswith(("sh", "ch", "s")) else "s")


def example(rng: random.Random, split: str) -> dict:
    """One record: the message (system prompt, user turn) and the JSON answer."""
    p = pools(split)
    order = {"customer": f"{rng.choice(p['first'])} {rng.choice(p['last'])}", "city": rng.choice(p["city"]),
             "product": rng.choice(p["product"]), "quantity": rng.randint(1, 9), "express": rng.random() < 0.5,
             "day": rng.choice(DAYS)}
    qty = WORDS[order["quantity"]] if rng.random() < 0.5 else str(order["quantity"])
    express = rng.choice(EXPRESS[order["express"]])
    message = rng.choice(TEMPLATES).format(customer=order["customer"], city=order["city"], product=order["product"],
                                           product_s=_plural(order["product"], order["quantity"]), qty=qty,
                                           express=express, express_cap=express[0].upper() + express[1:], day=order["day"])
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": message},
                         {"role": "assistant", "content": json.dumps(order, ensure_ascii=False)}]}


def make_splits(n_train: int = 300, n_test: int = 60, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic train and test records; no message occurs twice within or across the splits."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        while len(out[split]) < n:
            record = example(rng, split)
            text = record["messages"][1]["content"]
            if text not in seen:
                seen.add(text)
                out[split].append(record)
    return out["train"], out["test"]


def write_splits(directory: str | Path = HERE, n_train: int = 300, n_test: int = 60, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` into ``directory`` (each atomically)."""
    return write_jsonl_splits(directory, *make_splits(n_train, n_test, seed))


if __name__ == "__main__":
    for written in write_splits():
        print(written)
