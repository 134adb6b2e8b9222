"""Shop tool calls: a customer's request in, exactly one function call out, sized for a CPU LoRA run on a ~135M model.

Each record is a chat in the ``messages`` format: a system prompt listing six shop tools with their signatures
(``TOOLS``), one user request in varied English, and an assistant answer that is exactly one call on one line:

    get_order_status(order_id)                cancel_order(order_id, reason)
    track_parcel(tracking_number, carrier)    change_address(order_id, city, postcode)
    refund(order_id, amount)                  find_product(name, max_price)

Canonical answer format (what the ``exact_match`` metric compares, after whitespace collapsing and casefolding):
arguments by keyword, in signature order, joined by ``", "``; strings in double quotes (``reason`` is one of the four
values in ``REASONS``, ``carrier`` and ``city`` as spelled in the request, the product name in lower case); numbers
plain: ``amount`` with two decimals, ``max_price`` an integer, both without the currency the request writes, e.g.
``refund(order_id="B-4821", amount=19.99)`` or ``find_product(name="desk lamp", max_price=40)``.

Requests vary phrasing and word order (several templates per tool) and carry distractors: greetings, thanks,
irrelevant sentences and numbers that are not arguments (days waited, years as a customer). Harder cases built in:
two order numbers where only one is the argument ("my order B-1 arrived but B-2 did not, where is it?", "keep B-1,
send B-2 to ...", a cancellation because an order duplicates another), two amounts or prices where only one is the
argument ("I paid $58.99, refund $12.49 for the broken part", "my old lamp cost $20, find one under $40"), an order
number next to a tracking number (track_parcel takes the tracking number), and wording that points to another tool
("cancel the delivery to my old flat" is change_address, "tracking hasn't moved, just cancel it" is cancel_order,
"I don't want a refund, just tell me whether it shipped" is get_order_status).

The test split's entities (order ids, tracking numbers, carriers, cities, postcodes, product names, refund amounts,
maximum prices) never occur in the training split: every entity pool is partitioned into disjoint train/test parts,
no string value a substring of another (case-insensitive, across pools), so held-out accuracy measures calling, not
memorised values. The reasons' wording is shared. Tools are balanced (``n // 6`` each, the remainder spread over
distinct tools). Rendered examples are about 145-190 tokens, ~105 of them the shared system prompt.

    python -m tunelab.examples.toolcall.task      # regenerate train.jsonl / test.jsonl beside this file
"""

from __future__ import annotations

import random
from pathlib import Path

from tunelab.examples.splits import write_jsonl_splits

HERE = Path(__file__).parent
POOL_SEED = 11

# tool -> ((argument, type), ...) in signature order; "number" arguments are written without quotes
TOOLS: dict[str, tuple[tuple[str, str], ...]] = {
    "get_order_status": (("order_id", "string"),),
    "cancel_order": (("order_id", "string"), ("reason", "string")),
    "track_parcel": (("tracking_number", "string"), ("carrier", "string")),
    "change_address": (("order_id", "string"), ("city", "string"), ("postcode", "string")),
    "refund": (("order_id", "string"), ("amount", "number")),
    "find_product": (("name", "string"), ("max_price", "number")),
}
REASONS = ("changed mind", "ordered twice", "found cheaper", "delivery too slow")


SYSTEM_PROMPT = ("Answer with one tool call, keyword arguments in order, strings quoted:\n"
                 + "\n".join(f"{tool}({', '.join(arg for arg, _ in args)})" for tool, args in TOOLS.items())
                 + f"\nreason: {', '.join(REASONS[:-1])} or {REASONS[-1]}.")

# ------------------------------------------------------------------------------------ entity pools
# (train part, test part) per slot; order ids, tracking numbers and postcodes are drawn below.

CARRIERS = (["DHL", "UPS", "GLS", "Royal Mail"], ["FedEx", "DPD"])
CITIES = (["Leeds", "Lyon", "Porto", "Munich", "Krakow", "Dublin", "Turin", "Ghent"],
          ["Bergen", "Seville", "Tampere", "Brno"])
PRODUCTS = (["desk lamp", "yoga mat", "rain jacket", "coffee grinder", "tea kettle", "bike helmet", "swivel chair",
             "garden hose", "bath towel", "picture frame"],
            ["camping stove", "wool blanket", "table fan", "travel mug"])
AMOUNTS = (["12.49", "19.99", "24.50", "29.95", "34.99", "45.00", "58.99", "79.90"],
           ["17.25", "36.80", "63.49", "88.95"])
PRICES = ([20, 25, 30, 40, 50, 75, 100, 150], [35, 45, 60, 120])  # max_price; integers, compared as values


def _drawn_pools() -> dict[str, tuple[list[str], list[str]]]:
    """36/12 order ids ``B-1234``, 24/8 tracking numbers ``JX48213907``, 16/6 postcodes ``4021 KT``."""
    rng = random.Random(POOL_SEED)
    orders = [f"B-{n}" for n in rng.sample(range(2000, 10000), 48)]  # B-1234 is the prompt's example
    tracking = [f"{rng.choice('JKLMNPRTVX')}{rng.choice('XYZW')}{n}" for n in rng.sample(range(10**7, 10**8), 32)]
    letters = [a + b for a in "HKLMPRST" for b in "ABDFGNTWY"]
    postcodes = [f"{n} {p}" for n, p in zip(rng.sample(range(1000, 10000), 22), rng.sample(letters, 22))]
    return {"order": (orders[:36], orders[36:]), "tracking": (tracking[:24], tracking[24:]),
            "postcode": (postcodes[:16], postcodes[16:])}


def value_pools() -> dict[str, dict[str, list]]:
    """Every slot's values, split into disjoint ``train`` and ``test`` parts."""
    pools = {**_drawn_pools(), "carrier": CARRIERS, "city": CITIES, "product": PRODUCTS, "amount": AMOUNTS,
             "price": PRICES}
    return {slot: {"train": list(train), "test": list(test)} for slot, (train, test) in pools.items()}


def test_only_values() -> set[str]:
    """All string entity values used only by the test split (the integer ``price`` pool is compared by value)."""
    return {v for slot, pool in value_pools().items() if slot != "price" for v in pool["test"]}


# -------------------------------------------------------------------------------------- templates
# Filled with str.format. Slots: order (the argument), order2 (a distractor order), tracking, carrier, city,
# postcode, product, amount / amount2 and price / price2 (argument / distractor, written with a currency),
# why / Why (a phrasing of the cancellation reason), days (a number that is not an argument).

TEMPLATES: dict[str, list[str]] = {
    "get_order_status": [
        "What's the status of order {order}?",
        "Has {order} shipped yet? I placed it {days} days ago.",
        "Can you check on my order {order}, please? It's been a while.",
        "I'm still waiting. Order number: {order}. Any news?",
        "Where is my order? The number is {order}.",
        "My order {order2} arrived but {order} did not, where is it?",
        "I don't want a refund, just tell me whether order {order} has shipped.",
        "Forget {order2}, that one is fine. What is happening with {order}?",
    ],
    "cancel_order": [
        "Please cancel order {order}, {why}.",
        "{Why}, so I'd like to cancel {order}.",
        "Cancel {order} please. The reason: {why}.",
        "I want to cancel my order {order} because {why}.",
        "Could you stop order {order}? To be honest, {why}.",
        "I'd rather cancel {order} now than ask for a refund later: {why}.",
    ],
    "track_parcel": [
        "Can you track {carrier} parcel {tracking} for me?",
        "Where is my parcel? Tracking number {tracking}, sent with {carrier}.",
        "The {carrier} tracking {tracking} hasn't updated in {days} days.",
        "Please look up {tracking}, it's a {carrier} shipment.",
        "My order {order} shipped with {carrier} under tracking number {tracking}. Where is it now?",
        "Don't cancel anything yet, first tell me where {carrier} parcel {tracking} is.",
    ],
    "change_address": [
        "Please send order {order} to my new address: {postcode} {city}.",
        "I moved to {city} ({postcode}). Can you update the delivery address for {order}?",
        "New delivery address for {order}: {city}, postcode {postcode}.",
        "Could order {order} go to {city} instead? The postcode is {postcode}.",
        "Keep {order2} as it is, but ship {order} to {postcode} {city}.",
        "Cancel the delivery to my old flat: order {order} should go to {city}, {postcode}.",
    ],
    "refund": [
        "Please refund {amount} for order {order}.",
        "Order {order} arrived broken. I'd like {amount} back.",
        "I was overcharged by {amount} on {order}, please refund it.",
        "Can I get a refund of {amount} for {order}? One item was missing.",
        "I paid {amount2} for order {order}, but only one part was broken: please refund {amount} for it.",
        "Order {order2} was fine, but {order} came damaged. Refund {amount}, please.",
        "Don't cancel order {order}, it already arrived; just refund the {amount} for the missing charger.",
    ],
    "find_product": [
        "Do you have a {product} for under {price}?",
        "I'm looking for a {product}, my budget is {price} at most.",
        "Find me a {product}, nothing over {price}.",
        "Is there any {product} that costs {price} or less?",
        "My old {product} cost {price2} and broke after {days} years. Show me a new one up to {price}.",
        "Rather than a refund, I'd like a different {product}: anything below {price}?",
    ],
}

WHY: dict[str, list[str]] = {
    "changed mind": ["I've changed my mind", "I don't need it anymore", "I no longer want it"],
    "ordered twice": ["I ordered the same thing twice by mistake", "it duplicates my order {order2}",
                      "I already got the same item with order {order2}"],
    "found cheaper": ["I found it cheaper elsewhere", "another shop sells it for less"],
    "delivery too slow": ["the delivery takes far too long", "tracking hasn't moved in {days} days and I can't wait",
                          "I can't wait {days} weeks for it"],
}
GREETINGS = ["", "", "", "Hi! ", "Hello. ", "Good morning! ", "Hi there, quick one. "]
CLOSINGS = ["", "", "", " Thanks!", " Thank you so much.", " I've been a customer for {days} years.",
            " It's a birthday present.", " This is my second message today.", " Cheers."]
AMOUNT_STYLES = ["${}", "€{}", "{} euros", "{} EUR"]
PRICE_STYLES = ["${}", "€{}", "{} dollars", "{} euros"]


# ---------------------------------------------------------------------------------------- records


def format_call(tool: str, args: dict) -> str:
    """The canonical one-line call: keyword arguments in signature order, strings quoted, numbers plain."""
    parts = []
    for arg, kind in TOOLS[tool]:
        value = args[arg]
        parts.append(f'{arg}={value}' if kind == "number" else f'{arg}="{value}"')
    return f"{tool}({', '.join(parts)})"


def _draw(pools: dict[str, list], rng: random.Random) -> dict:
    """Slot values: arguments, distinct distractors, currency-styled numbers, a cancellation reason."""
    (order, order2), (amount, amount2), (price, price2) = (rng.sample(pools[s], 2) for s in ("order", "amount", "price"))
    values = {slot: rng.choice(pool) for slot, pool in pools.items()}
    values.update(order=order, order2=order2, days=rng.randint(2, 9), reason=rng.choice(REASONS))
    amount_style, price_style = rng.choice(AMOUNT_STYLES), rng.choice(PRICE_STYLES)
    values.update(amount_value=amount, amount=amount_style.format(amount), amount2=amount_style.format(amount2),
                  price_value=price, price=price_style.format(price), price2=price_style.format(price2))
    why = rng.choice(WHY[values["reason"]]).format(**values)
    values.update(why=why, Why=why[0].upper() + why[1:])
    return values


def _arguments(tool: str, values: dict) -> dict:
    """The call's arguments for ``tool`` from the drawn slot values."""
    source = {"order_id": values["order"], "reason": values["reason"], "tracking_number": values["tracking"],
              "carrier": values["carrier"], "city": values["city"], "postcode": values["postcode"],
              "amount": values["amount_value"], "name": values["product"], "max_price": values["price_value"]}
    return {arg: source[arg] for arg, _ in TOOLS[tool]}


def _record(request: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": request},
                         {"role": "assistant", "content": answer}]}


def _render(tool: str, template: str, pools: dict[str, list], rng: random.Random) -> dict:
    """One record of ``tool`` from ``template``: slot values, a greeting and a closing around the request."""
    values = _draw(pools, rng)
    request = rng.choice(GREETINGS) + template.format(**values) + rng.choice(CLOSINGS).format(**values)
    return _record(request, format_call(tool, _arguments(tool, values)))


def _tool_records(tool: str, n: int, split: str, rng: random.Random) -> list[dict]:
    """``n`` records of ``tool`` with distinct requests from ``split``'s entities, cycling through its templates."""
    pools = {slot: parts[split] for slot, parts in value_pools().items()}
    templates = list(TEMPLATES[tool])
    rng.shuffle(templates)
    out: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n:
            raise RuntimeError(f"cannot draw {n} distinct {tool!r} requests from the {split} pools")
        record = _render(tool, templates[len(out) % len(templates)], pools, rng)
        if record["messages"][1]["content"] not in seen:
            seen.add(record["messages"][1]["content"])
            out.append(record)
    return out


def _split(n: int, split: str, rng: random.Random) -> list[dict]:
    """``n`` shuffled records, ``n // 6`` per tool and the remainder on distinct random tools."""
    if n < len(TOOLS):
        raise ValueError(f"need at least {len(TOOLS)} examples per split (one per tool), got {n}")
    extra = set(rng.sample(list(TOOLS), n % len(TOOLS)))
    rows: list[dict] = []
    for tool in TOOLS:
        rows.extend(_tool_records(tool, n // len(TOOLS) + (tool in extra), split, rng))
    rng.shuffle(rows)
    return rows


def make_splits(n_train: int = 300, n_test: int = 60, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic chat-format train/test records; tools balanced, test entities unseen in train."""
    rng = random.Random(seed)
    return _split(n_train, "train", rng), _split(n_test, "test", rng)


def call_of(record: dict) -> str:
    """The record's gold call (its final assistant turn)."""
    return record["messages"][-1]["content"]


def write_splits(directory: str | Path = HERE, n_train: int = 300, n_test: int = 60, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` into ``directory`` (atomically); return their paths."""
    return write_jsonl_splits(directory, *make_splits(n_train, n_test, seed))


if __name__ == "__main__":
    for p in write_splits():
        print(p)
