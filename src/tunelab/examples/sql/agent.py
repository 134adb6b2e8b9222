"""The SQL agent's SFT data: the text-to-SQL training questions as conversations with the ``run_sql`` tool.

Agentic GRPO (``configs/smollm2-135m-instruct/grpo_lora_sql_agent.yaml``) lets the model query the shop database
before it answers; a 135M model that has never seen the tool-call format does not call it, and one SFT'd on
plain question -> query pairs answers at once. This file's conversations teach both moves on the 240 training
questions, with the tool listed in every one (``agent_train.tools.json``, the schema of
:meth:`tunelab.rewards.tool_envs.ShopSql.run_sql`, so training and the environment list the same tool):

* a third (chosen by a fixed seed): the model answers with the query at once;
* a third: it calls ``run_sql`` with the gold query, reads the rows the environment returns (the real result on
  the shop database, formatted as the environment formats it) and answers with the query;
* a third: it calls ``run_sql`` with a query one column name off (``day`` as ``date``, ``price`` as ``cost``:
  the mistakes a small model makes with a schema), reads the environment's error and answers with the corrected
  query: what looking at the result is for.

GRPO then finds out from the execution-match reward when querying first pays.

    python -m tunelab.examples.sql.agent     # regenerate agent_train.jsonl and its tools beside this file
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from pathlib import Path

from tunelab.atomic import write_text_atomic
from tunelab.examples.sql.task import HERE, build_database

# Column names a small model puts in place of the schema's (each makes SQLite answer "no such column").
WRONG_COLUMNS = {"day": "date", "price": "cost", "city": "town", "category": "type", "quantity": "qty",
                 "stock": "inventory", "customer_id": "customer", "product_id": "product"}


def broken(query: str) -> str | None:
    """``query`` with its first column in :data:`WRONG_COLUMNS` renamed (None when it has none)."""
    for column, wrong in WRONG_COLUMNS.items():
        changed = re.sub(rf"\b{column}\b", wrong, query, count=1)
        if changed != query:
            return changed
    return None


def agent_records(records: list[dict], step, seed: int = 0) -> list[dict]:
    """``records`` (system, question, gold query) as tool conversations; ``step(query) -> tool message content``
    runs the tool as the environment does (errors included)."""
    rng = random.Random(seed)
    out = []
    for n, record in enumerate(records):
        *opening, answer = record["messages"]
        kind = rng.choice(["answer", "query", "fix"])
        tried = answer["content"] if kind == "query" else broken(answer["content"]) if kind == "fix" else None
        if tried is None:
            out.append({"messages": [*opening, answer]})
            continue
        call_id = f"call_{n}"
        out.append({"messages": [
            *opening,
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "run_sql", "arguments": {"query": tried}}}]},
            {"role": "tool", "tool_call_id": call_id, "content": step(tried)},
            answer]})
    return out


def write_agent_data(directory: str | Path = HERE, source: str | Path = HERE / "train.jsonl") -> tuple[Path, Path]:
    """Write ``agent_train.jsonl`` and ``agent_train.tools.json`` into ``directory`` (atomically)."""
    from tunelab.rewards.tool_envs import ShopSql

    directory = Path(directory)
    records = [json.loads(line) for line in Path(source).read_text().splitlines() if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        env = ShopSql(str(build_database(Path(tmp) / "shop.sqlite")))
        try:
            rows = agent_records(records, lambda q: env.step([{"name": "run_sql", "arguments": {"query": q}}])[0]["content"])
            tools = env.tools
        finally:
            env.close()
    data, sidecar = directory / "agent_train.jsonl", directory / "agent_train.tools.json"
    write_text_atomic(data, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_text_atomic(sidecar, json.dumps(tools, indent=1) + "\n")
    return data, sidecar


if __name__ == "__main__":
    for path in write_agent_data():
        print(path)
