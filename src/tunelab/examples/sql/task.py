"""A small text-to-SQL task of our own making, sized for a CPU LoRA demo on a ~135M model.

Every rendered example (system prompt with the schema, question, SQL answer) is kept to roughly
100-130 tokens, because CPU training runs at only ~150 tokens/s. The database is tiny and built
deterministically; the questions come from intent templates (several paraphrases each) with one
canonical gold-SQL style:

* keywords upper case, no trailing semicolon, string literals in single quotes, numbers bare;
* single-table queries use bare column names; joins alias tables by their first letter
  (``orders o JOIN products p ON p.id = o.product_id``);
* ``ORDER BY`` only where the question asks for an order or a top-k.

The test split's slot values (categories, cities, customers, products, weekdays, numbers) never
occur in the training split: every value pool is partitioned into disjoint train/test parts, so
held-out accuracy measures the SQL skill, not memorised answers.

    python -m tunelab.examples.sql.task      # regenerate train.jsonl / test.jsonl beside this file
"""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import tempfile
from pathlib import Path

from tunelab.atomic import write_text_atomic

HERE = Path(__file__).parent

SCHEMA = (
    "products(id, name, category, price, stock)\n"
    "customers(id, name, city)\n"
    "orders(id, customer_id, product_id, quantity, day)"
)
SYSTEM_PROMPT = "Write one SQLite query that answers the question. Tables:\n" + SCHEMA

DB_SEED = 2024

# ------------------------------------------------------------------------------------ value pools
# Each pool is (train part, test part); the parts are disjoint and no test value is a word of any
# train value. Products are partitioned by category: the test categories' products are test-only.

PRODUCTS_BY_CATEGORY: dict[str, list[str]] = {
    "kitchen": ["Bread Knife", "Salad Bowl", "Pepper Mill", "Rice Cooker", "Tea Kettle"],
    "garden": ["Hose Reel", "Seed Tray", "Pruning Shears", "Flower Pot", "Watering Can"],
    "toys": ["Rubber Duck", "Puzzle Cube", "Kite", "Robot Kit", "Marble Run"],
    "books": ["Atlas", "Cookbook", "Travel Guide", "Comic Album", "Dictionary"],
    "sports": ["Tennis Racket", "Yoga Mat", "Football", "Ski Goggles", "Jump Rope"],
    "music": ["Guitar Strings", "Drum Sticks", "Ukulele", "Harmonica", "Metronome"],
}
CATEGORIES = list(PRODUCTS_BY_CATEGORY)
TRAIN_CATEGORIES = ["kitchen", "garden", "toys", "books"]
TEST_CATEGORIES = ["sports", "music"]

CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Vienna", "Lisbon"]
TRAIN_CITIES, TEST_CITIES = CITIES[:4], CITIES[4:]

CUSTOMERS = ["Ana Silva", "Ben Carter", "Chloe Martin", "David Kim", "Emma Rossi", "Felix Wagner",
             "Grace Lee", "Hugo Blanc", "Iris Novak", "Jack Turner", "Kate Moreno", "Liam Walsh",
             "Maya Patel", "Noah Fischer", "Olivia Grant", "Paul Dubois", "Quinn Harper", "Rosa Mendes",
             "Sam Okafor", "Tara Singh"]
TRAIN_CUSTOMERS, TEST_CUSTOMERS = CUSTOMERS[:14], CUSTOMERS[14:]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TRAIN_DAYS = ["Monday", "Tuesday", "Wednesday", "Friday", "Saturday"]
TEST_DAYS = ["Thursday", "Sunday"]

# Numbers: disjoint across the splits as a whole (a test number appears in no training example,
# whatever slot it fills). 1 is reserved for LIMIT 1.
TRAIN_PRICES, TEST_PRICES = [10, 20, 30, 40, 60, 80], [15, 35, 50]
TRAIN_STOCKS, TEST_STOCKS = [5, 10, 12, 20, 24], [8, 18]
TRAIN_TOPN, TEST_TOPN = [2, 3, 5], [4, 6]


def value_pools() -> dict[str, dict[str, list]]:
    """Every slot's values, split into disjoint ``train`` and ``test`` parts."""
    return {
        "category": {"train": list(TRAIN_CATEGORIES), "test": list(TEST_CATEGORIES)},
        "product": {"train": [p for c in TRAIN_CATEGORIES for p in PRODUCTS_BY_CATEGORY[c]],
                    "test": [p for c in TEST_CATEGORIES for p in PRODUCTS_BY_CATEGORY[c]]},
        "city": {"train": list(TRAIN_CITIES), "test": list(TEST_CITIES)},
        "customer": {"train": list(TRAIN_CUSTOMERS), "test": list(TEST_CUSTOMERS)},
        "day": {"train": list(TRAIN_DAYS), "test": list(TEST_DAYS)},
        "price": {"train": list(TRAIN_PRICES), "test": list(TEST_PRICES)},
        "stock": {"train": list(TRAIN_STOCKS), "test": list(TEST_STOCKS)},
        "n": {"train": list(TRAIN_TOPN), "test": list(TEST_TOPN)},
    }


def test_only_values() -> set[str]:
    """All slot values used only by the test split, as strings."""
    return {str(v) for pool in value_pools().values() for v in pool["test"]}


# --------------------------------------------------------------------------------------- intents
# name -> (slots, paraphrases, gold SQL template). Slots are filled with str.format.

INTENTS: dict[str, tuple[tuple[str, ...], list[str], str]] = {
    "count_in_category": (
        ("category",),
        ["How many products are in the {category} category?",
         "Count the {category} products.",
         "What is the number of products in category {category}?",
         "How many {category} products are there?"],
        "SELECT COUNT(*) FROM products WHERE category = '{category}'"),
    "cheaper_than": (
        ("price",),
        ["List the names of products cheaper than {price}.",
         "Which products cost less than {price}?",
         "Show the products priced under {price}."],
        "SELECT name FROM products WHERE price < {price}"),
    "pricier_than": (
        ("price",),
        ["Which products cost more than {price}?",
         "List the products with a price above {price}.",
         "Name the products priced over {price}."],
        "SELECT name FROM products WHERE price > {price}"),
    "avg_price_in_category": (
        ("category",),
        ["What is the average price of {category} products?",
         "Give the mean price in the {category} category.",
         "What do {category} products cost on average?",
         "Average price of products in category {category}?"],
        "SELECT AVG(price) FROM products WHERE category = '{category}'"),
    "total_stock_in_category": (
        ("category",),
        ["How many {category} items are in stock in total?",
         "What is the total stock of {category} products?",
         "Sum the stock of all products in the {category} category.",
         "How many units of {category} products are in stock?"],
        "SELECT SUM(stock) FROM products WHERE category = '{category}'"),
    "most_expensive_in_category": (
        ("category",),
        ["What is the most expensive {category} product?",
         "Which product in the {category} category has the highest price?",
         "Name the priciest product in category {category}.",
         "Which {category} product costs the most?"],
        "SELECT name FROM products WHERE category = '{category}' ORDER BY price DESC LIMIT 1"),
    "cheapest_in_category": (
        ("category",),
        ["What is the cheapest product in the {category} category?",
         "Which {category} product has the lowest price?",
         "Name the least expensive {category} product.",
         "Which product in category {category} costs the least?"],
        "SELECT name FROM products WHERE category = '{category}' ORDER BY price LIMIT 1"),
    "category_cheaper_than": (
        ("category", "price"),
        ["List the {category} products cheaper than {price}.",
         "Which {category} products cost less than {price}?"],
        "SELECT name FROM products WHERE category = '{category}' AND price < {price}"),
    "low_stock_by_name": (
        ("stock",),
        ["List the products with fewer than {stock} in stock, sorted by name.",
         "Which products have stock below {stock}? Order them alphabetically.",
         "Alphabetically, which products have less than {stock} units in stock?"],
        "SELECT name FROM products WHERE stock < {stock} ORDER BY name"),
    "top_n_expensive": (
        ("n",),
        ["List the {n} most expensive products.",
         "Which {n} products have the highest prices?",
         "Show the top {n} products by price."],
        "SELECT name FROM products ORDER BY price DESC LIMIT {n}"),
    "customers_in_city": (
        ("city",),
        ["Which customers live in {city}?",
         "List the names of customers from {city}.",
         "Who are our customers in {city}?",
         "Show the customers based in {city}."],
        "SELECT name FROM customers WHERE city = '{city}'"),
    "count_customers_in_city": (
        ("city",),
        ["How many customers are from {city}?",
         "Count the customers who live in {city}.",
         "What is the number of customers in {city}?",
         "How many of our customers are based in {city}?"],
        "SELECT COUNT(*) FROM customers WHERE city = '{city}'"),
    "price_of_product": (
        ("product",),
        ["What does the {product} cost?",
         "What is the price of the {product}?"],
        "SELECT price FROM products WHERE name = '{product}'"),
    "total_quantity_of_product": (
        ("product",),
        ["How many units of the {product} were ordered in total?",
         "What is the total quantity ordered of the {product}?"],
        "SELECT SUM(o.quantity) FROM orders o JOIN products p ON p.id = o.product_id WHERE p.name = '{product}'"),
    "orders_by_customer": (
        ("customer",),
        ["How many orders has {customer} placed?",
         "Count the orders made by {customer}."],
        "SELECT COUNT(*) FROM orders o JOIN customers c ON c.id = o.customer_id WHERE c.name = '{customer}'"),
    "orders_on_day": (
        ("day",),
        ["How many orders were placed on {day}?",
         "Count the orders from {day}.",
         "What is the number of orders made on a {day}?"],
        "SELECT COUNT(*) FROM orders WHERE day = '{day}'"),
}


# -------------------------------------------------------------------------------------- database


def _rows(seed: int = DB_SEED) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """Deterministic table contents: 30 products (6 categories), 20 customers (6 cities), 200 orders."""
    rng = random.Random(seed)
    n_products = sum(len(v) for v in PRODUCTS_BY_CATEGORY.values())
    cents = rng.sample(range(299, 9999, 10), n_products)  # distinct prices: no ties under ORDER BY price
    products, pid = [], 0
    for category, names in PRODUCTS_BY_CATEGORY.items():
        for name in names:
            products.append((pid + 1, name, category, cents[pid] / 100, rng.randint(0, 40)))
            pid += 1
    order = list(range(len(CUSTOMERS)))
    rng.shuffle(order)
    customers = sorted((i + 1, CUSTOMERS[i], CITIES[k % len(CITIES)]) for k, i in enumerate(order))
    orders = [(i + 1, rng.randint(1, len(customers)), rng.randint(1, len(products)), rng.randint(1, 5),
               rng.choice(DAYS)) for i in range(200)]
    return products, customers, orders


def _fill(conn: sqlite3.Connection) -> None:
    products, customers, orders = _rows()
    conn.executescript(
        "CREATE TABLE products(id INTEGER PRIMARY KEY, name TEXT, category TEXT, price REAL, stock INTEGER);"
        "CREATE TABLE customers(id INTEGER PRIMARY KEY, name TEXT, city TEXT);"
        "CREATE TABLE orders(id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id),"
        " product_id INTEGER REFERENCES products(id), quantity INTEGER, day TEXT);")
    conn.executemany("INSERT INTO products VALUES (?, ?, ?, ?, ?)", products)
    conn.executemany("INSERT INTO customers VALUES (?, ?, ?)", customers)
    conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?)", orders)
    conn.commit()


def build_database(path: str | Path) -> Path:
    """Create the example SQLite database at ``path`` (overwriting it atomically); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        conn = sqlite3.connect(tmp)
        try:
            _fill(conn)
        finally:
            conn.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _memory_db() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    _fill(conn)
    return conn


# ---------------------------------------------------------------------------------------- splits


def _candidates(conn: sqlite3.Connection, intent: str, split: str) -> list[tuple[str, str]]:
    """Every (question, sql) of ``intent`` from ``split``'s values whose gold SQL returns rows."""
    slots, paraphrases, sql_template = INTENTS[intent]
    pools = value_pools()
    combos: list[dict] = [{}]
    for slot in slots:
        combos = [{**c, slot: v} for c in combos for v in pools[slot][split]]
    out = []
    for values in combos:
        sql = sql_template.format(**values)
        rows = conn.execute(sql).fetchall()
        if not rows or all(v is None for row in rows for v in row):
            continue
        out.extend((p.format(**values), sql) for p in paraphrases)
    return out


def _record(question: str, sql: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": question},
                         {"role": "assistant", "content": sql}]}


def _split(conn: sqlite3.Connection, n: int, split: str, rng: random.Random) -> list[dict]:
    intents = list(INTENTS)
    if n < len(intents):
        raise ValueError(f"need at least {len(intents)} examples per split to cover every intent, got {n}")
    extra = set(rng.sample(intents, n % len(intents)))
    rows: list[tuple[str, str]] = []
    for intent in intents:
        want = n // len(intents) + (intent in extra)
        cands = _candidates(conn, intent, split)
        if not cands:
            raise RuntimeError(f"intent {intent!r} has no non-empty {split} example")
        rng.shuffle(cands)
        rows.extend(cands[i % len(cands)] for i in range(want))  # repeats only once the pool runs out
    rng.shuffle(rows)
    return [_record(q, s) for q, s in rows]


def make_splits(n_train: int = 240, n_test: int = 40, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic chat-format train/test records; every intent in both, test values unseen in train."""
    rng = random.Random(seed)
    conn = _memory_db()
    try:
        return _split(conn, n_train, "train", rng), _split(conn, n_test, "test", rng)
    finally:
        conn.close()


def intent_of(sql: str) -> str:
    """The intent whose gold-SQL template produced ``sql`` (for grouping results)."""
    for name, (_, _, template) in INTENTS.items():
        pattern = re.sub(r"\\\{[a-z_]+\\\}", "[^']+", re.escape(template))
        if re.fullmatch(pattern, sql):
            return name
    raise ValueError(f"no intent matches {sql!r}")


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def about_orders(record: dict) -> bool:
    """The orders sub-domain: questions whose gold SQL reads the ``orders`` table (counts by day, joins)."""
    return re.search(r"\b(FROM|JOIN) orders\b", record["messages"][-1]["content"]) is not None


def write_splits(directory: str | Path = HERE, n_train: int = 240, n_test: int = 40, seed: int = 0) -> tuple[Path, ...]:
    """Write ``train.jsonl`` and ``test.jsonl`` into ``directory``, and their orders sub-domain (``orders_train.jsonl``,
    ``orders_test.jsonl``: the sequential pipeline's last stage); return their paths."""
    directory = Path(directory)
    train, test = make_splits(n_train, n_test, seed)
    paths = (directory / "train.jsonl", directory / "test.jsonl", directory / "orders_train.jsonl", directory / "orders_test.jsonl")
    for path, records in zip(paths, (train, test, [r for r in train if about_orders(r)], [r for r in test if about_orders(r)])):
        write_text_atomic(path, _jsonl(records))
    return paths


if __name__ == "__main__":
    for p in write_splits():
        print(p)
