"""The shop tool task in OpenAI's tool-calling format: the records agent frameworks, vLLM and the anchors train on.

The same requests, entities and held-out split as :mod:`tunelab.examples.toolcall.task`, written the way an agent
framework sends them: the six shop functions as JSON-schema ``tools`` (in the sidecar ``NAME.tools.json`` beside
each ``NAME.jsonl``), the user's request, and an assistant message whose ``tool_calls`` carry the call with its
arguments as JSON (``amount`` a number with two decimals, ``max_price`` an integer, ``reason`` one of four values).
No format instructions are in the system turn: the tools and the chat template say everything, as they do when
an application calls a served model.

In the training split every third record goes one round further, as an agent loop does: the ``tool`` message
with what the shop function returned (:data:`FUNCTIONS`, plain Python, deterministic) and the assistant's final
answer in a sentence, so a tuned model also learns to answer once the result is there instead of calling again.
The test split ends at the call: its score is the ``tool_call`` metric (function and arguments exactly right).

    python -m tunelab.examples.toolcall.openai_format   # regenerate openai/{train,test}.jsonl and their tools
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from tunelab.atomic import write_text_atomic
from tunelab.examples.splits import write_jsonl_splits
from tunelab.examples.toolcall import task

HERE = Path(__file__).parent / "openai"
SYSTEM = "You are the customer service assistant of an online shop. Use the tools to serve the customer's request."
FOLLOW_UP_EVERY = 3  # every third training record also has the tool's result and the final answer

_STRING = {"type": "string"}
_ORDER = _STRING
TOOLS: list[dict] = [
    {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": list(properties)}}}
    for name, description, properties in (
        ("get_order_status", "Status of an order", {"order_id": _ORDER}),
        ("cancel_order", "Cancel an order", {"order_id": _ORDER, "reason": {"type": "string", "enum": list(task.REASONS)}}),
        ("track_parcel", "Where a parcel is", {"tracking_number": _STRING, "carrier": _STRING}),
        ("change_address", "Send an order to a new address", {"order_id": _ORDER, "city": _STRING, "postcode": _STRING}),
        ("refund", "Refund an amount of an order", {"order_id": _ORDER, "amount": {"type": "number"}}),
        ("find_product", "Search the catalogue", {"name": _STRING, "max_price": {"type": "integer"}}),
    )
]


def _day(*keys) -> int:
    """A stable small number from the arguments (zlib.crc32, not hash(): the same in every process)."""
    return 1 + zlib.crc32(json.dumps(keys).encode()) % 6


def get_order_status(order_id: str) -> dict:
    return {"order_id": order_id, "status": "shipped", "days_to_delivery": _day(order_id)}


def cancel_order(order_id: str, reason: str) -> dict:
    return {"order_id": order_id, "cancelled": True, "reason": reason}


def track_parcel(tracking_number: str, carrier: str) -> dict:
    return {"tracking_number": tracking_number, "carrier": carrier, "days_to_delivery": _day(tracking_number)}


def change_address(order_id: str, city: str, postcode: str) -> dict:
    return {"order_id": order_id, "ships_to": f"{postcode} {city}"}


def refund(order_id: str, amount: float) -> dict:
    return {"order_id": order_id, "refunded": amount, "days_to_account": _day(order_id, amount)}


def find_product(name: str, max_price: int) -> dict:
    price = max(1, max_price - _day(name, max_price))
    return {"name": name, "found": 1, "price": price}


FUNCTIONS = {f.__name__: f for f in (get_order_status, cancel_order, track_parcel, change_address, refund, find_product)}


def answer_for(name: str, result: dict) -> str:
    """The assistant's final sentence once ``result`` of function ``name`` is known."""
    r = result
    return {
        "get_order_status": lambda: f"Order {r['order_id']} has shipped; it should arrive in {r['days_to_delivery']} days.",
        "cancel_order": lambda: f"Order {r['order_id']} is cancelled.",
        "track_parcel": lambda: f"Your {r['carrier']} parcel {r['tracking_number']} should arrive in {r['days_to_delivery']} days.",
        "change_address": lambda: f"Order {r['order_id']} will now be shipped to {r['ships_to']}.",
        "refund": lambda: f"{r['refunded']:.2f} is refunded for order {r['order_id']}; expect it within {r['days_to_account']} days.",
        "find_product": lambda: f"We have a {r['name']} for {r['price']}.",
    }[name]()


def _call(record: dict) -> tuple[str, dict]:
    """(function, arguments as JSON values) of a plain-format record's gold call."""
    call = task.call_of(record)
    return call.split("(", 1)[0], _parse(call)


def _parse(call: str) -> dict:
    """Arguments of a canonical one-line call (``task.format_call``'s output), typed as the schemas say."""
    name, inner = call.split("(", 1)
    arguments: dict = {}
    for arg, kind in task.TOOLS[name]:
        start = inner.index(f"{arg}=") + len(arg) + 1
        if kind == "number":
            end = inner.find(",", start)
            text = inner[start:end if end >= 0 else inner.rindex(")")]
            arguments[arg] = int(text) if arg == "max_price" else float(text)
        else:
            end = inner.index('"', start + 1)
            arguments[arg] = inner[start + 1:end]
    return arguments


def convert(record: dict, index: int, follow_up: bool) -> dict:
    """The OpenAI-format record of a plain-format one (its tools come from the sidecar)."""
    name, arguments = _call(record)
    call_id = f"call_{index}"
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": record["messages"][1]["content"]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]}]
    if follow_up:
        result = FUNCTIONS[name](**arguments)
        messages += [{"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
                     {"role": "assistant", "content": answer_for(name, result)}]
    return {"messages": messages}


def make_splits(n_train: int = 180, n_test: int = 60, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The plain task's splits in OpenAI format; every ``FOLLOW_UP_EVERY``-th training record has a second round."""
    train, test = task.make_splits(n_train, n_test, seed)
    return ([convert(r, i, i % FOLLOW_UP_EVERY == FOLLOW_UP_EVERY - 1) for i, r in enumerate(train)],
            [convert(r, i, False) for i, r in enumerate(test)])


def write_splits(directory: str | Path = HERE, n_train: int = 180, n_test: int = 60, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl``, ``test.jsonl`` and their ``.tools.json`` sidecars into ``directory`` (atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = write_jsonl_splits(directory, *make_splits(n_train, n_test, seed))
    for path in paths:
        write_text_atomic(path.with_suffix(".tools.json"), json.dumps(TOOLS, indent=1) + "\n")
    return paths


if __name__ == "__main__":
    for p in write_splits():
        print(p)
