"""The ``sql_exec`` metric: execution accuracy of model-written SQL on a SQLite database, safely.

Predicted and gold queries run on the database opened read-only (``query_only``, an authorizer that only
allows reads, one statement), in a child process with caps on rows (``max_rows``) and result bytes
(``max_bytes``, also SQLite's length limit where Python can set it) and a memory limit, killed when a query
outlives ``timeout_s``: SQLite checks its progress handler only between virtual-machine steps, so one long
function call (``printf('%.*c', 900000000, 'x')``) cannot be interrupted in-process, and a MemoryError must
never reach the evaluation. Any failure of a predicted query scores 0 for that example, with the reason in
its details; a failing gold query is an error naming the example. Results are compared as multisets unless
the gold query has a top-level ``ORDER BY``. Hand-written because no library scores SQL by execution with
these guarantees.
"""

from __future__ import annotations

import math
import marshal
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.evaluation.scoring import MetricResult, per_example, register_metric, strip_fence

def _mask_sql(sql: str, parens: bool) -> str:
    """Replace string literals, quoted identifiers and comments (and, if ``parens``, everything inside
    parentheses) by spaces, keeping positions. A heuristic scanner, not a parser: good enough to find
    top-level ``;`` and ``ORDER BY`` in queries SQLite accepts."""
    out, i, depth, n = list(sql), 0, 0, len(sql)
    closers = {"'": "'", '"': '"', "`": "`", "[": "]"}
    while i < n:
        c = sql[i]
        if c in closers:
            end = sql.find(closers[c], i + 1)
            end = n - 1 if end < 0 else end
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n - 1 if end < 0 else end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n - 1 if end < 0 else end + 1
        else:
            depth += (c == "(") - (c == ")") if parens else 0
            if parens and (depth > 0 or c == ")"):
                out[i] = " "
            i += 1
            continue
        out[i:end + 1] = " " * (end + 1 - i)
        i = end + 1
    return "".join(out)


def _one_statement(sql: str) -> str | None:
    """The query without a code fence or trailing semicolons, or None if it holds several statements."""
    sql = strip_fence(sql)
    masked = _mask_sql(sql, parens=False)
    cut = masked.find(";")
    if cut < 0:
        return sql.strip()
    if masked[cut:].replace(";", "").strip():
        return None
    return sql[:cut].strip()


_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)


def has_top_level_order_by(sql: str) -> bool:
    """Whether ``ORDER BY`` appears outside literals, comments and parentheses (so not in subqueries,
    CTE bodies or window ``OVER (...)`` clauses)."""
    return bool(_ORDER_BY.search(_mask_sql(sql, parens=True)))


def _norm_value(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value):
        value = round(value, 6)
        return int(value) if value.is_integer() else value
    return value


# Killing the query process allows this much beyond timeout_s: starting it, the pipe and the reply.
_KILL_GRACE_S = 1.0
_SQL_DEFAULTS = {"timeout_s": 2.0, "max_rows": 10_000, "max_bytes": 10_000_000}


def _sql_limits(opts: dict) -> tuple[float, int, int]:
    """``timeout_s``, ``max_rows`` and ``max_bytes`` from the options, checked."""
    timeout_s = opts.get("timeout_s", _SQL_DEFAULTS["timeout_s"])
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise TunelabError(f"sql_exec metric: option timeout_s must be a positive number of seconds, got {timeout_s!r}; "
                           f"e.g. timeout_s={_SQL_DEFAULTS['timeout_s']}.")
    caps = []
    for key in ("max_rows", "max_bytes"):
        value = opts.get(key, _SQL_DEFAULTS[key])
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise TunelabError(f"sql_exec metric: option {key} must be a positive whole number, got {value!r}; "
                               f"e.g. {key}={_SQL_DEFAULTS[key]}.")
        caps.append(value)
    return float(timeout_s), caps[0], caps[1]


def _connect(db: Any, max_bytes: int = _SQL_DEFAULTS["max_bytes"]) -> tuple[sqlite3.Connection, list[float]]:
    """Open ``db`` read-only, allowing only reads, with a per-query deadline (``deadline[0]``); no string,
    blob or row may exceed ``max_bytes`` (Python >= 3.11; see :func:`_sql_exec` for 3.10)."""
    path = Path(db)
    if not path.is_file():
        raise TunelabError(f"sql_exec metric: database {str(db)!r} not found; pass db= the path of an existing SQLite file.")
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                           check_same_thread=False)
    conn.execute("PRAGMA query_only = ON")
    allowed = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
    conn.set_authorizer(lambda action, *_: sqlite3.SQLITE_OK if action in allowed else sqlite3.SQLITE_DENY)
    if sys.version_info >= (3, 11):  # Connection.setlimit is new in 3.11
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_bytes)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH, 1000)  # LIKE's cost grows with text x pattern
    deadline = [math.inf]
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline[0]), 1000)
    return conn, deadline


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes)) else 8


def _run_sql(conn: sqlite3.Connection, deadline: list[float], sql: str, timeout_s: float,
             max_rows: int = _SQL_DEFAULTS["max_rows"], max_bytes: int = _SQL_DEFAULTS["max_bytes"]) -> list[tuple]:
    """The normalised rows of ``sql``, fetched in batches; more than ``max_rows`` rows or ``max_bytes``
    of values in all is an error (a forgotten join condition must not fill the memory)."""
    deadline[0] = time.monotonic() + timeout_s
    rows: list[tuple] = []
    size = 0
    try:
        cursor = conn.execute(sql)
        while batch := cursor.fetchmany(1000):
            rows.extend(tuple(_norm_value(v) for v in row) for row in batch)
            size += sum(_size(v) for row in batch for v in row)
            if len(rows) > max_rows:
                raise ValueError(f"the result has more than max_rows={max_rows} rows")
            if size > max_bytes:
                raise ValueError(f"the result holds more than max_bytes={max_bytes} bytes")
    except sqlite3.OperationalError as e:
        if time.monotonic() > deadline[0] and "interrupt" in str(e):
            raise sqlite3.OperationalError(f"query stopped after {timeout_s} s (timeout_s)") from e
        raise
    finally:
        deadline[0] = math.inf
    return rows


def serve_sql(argv: list[str]) -> None:
    """The query process: read queries from stdin, write ``("ok", rows)`` or ``("error", text)`` to stdout."""
    db, timeout_s, max_rows, max_bytes = argv[0], float(argv[1]), int(argv[2]), int(argv[3])
    try:
        import resource  # Unix only; elsewhere the caps above and the kill bound the damage

        memory = 256 * 2**20 + 8 * max_bytes + 1024 * max_rows
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    except (ImportError, ValueError, OSError):
        pass
    conn, deadline = _connect(db, max_bytes)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while header := stdin.read(8):
        sql = marshal.loads(stdin.read(int.from_bytes(header, "little")))
        try:
            reply = marshal.dumps(("ok", _run_sql(conn, deadline, sql, timeout_s, max_rows, max_bytes)))
        except Exception as e:  # noqa: BLE001 - any failure of a query is that query's result
            reply = marshal.dumps(("error", f"{type(e).__name__}: {e}"))
        stdout.write(len(reply).to_bytes(8, "little") + reply)
        stdout.flush()


class _QueryFailed(RuntimeError):
    """A query failed in the query process; the message says why."""


class SqlProcess:
    """Runs queries in a child process, killed when one outlives ``timeout_s``.

    SQLite checks its progress handler between virtual-machine steps only, so one long function call
    (``printf('%.*c', 900000000, 'x')``, ``trim``/``replace``/``instr`` over megabytes) cannot be
    interrupted in-process; killing the process can. It also keeps a MemoryError away from the evaluation.
    """

    def __init__(self, db: Any, timeout_s: float, max_rows: int, max_bytes: int):
        self.timeout_s = timeout_s
        self._args = [str(Path(db).resolve()), repr(timeout_s), str(max_rows), str(max_bytes)]
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ)  # the child imports this very tunelab, wherever it came from
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
        code = "import sys; from tunelab.evaluation.sql_exec import serve_sql; serve_sql(sys.argv[1:])"
        return subprocess.Popen([sys.executable, "-c", code, *self._args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env)

    def run(self, sql: str) -> list[tuple]:
        """The rows of ``sql``; raises _QueryFailed with the reason when the query fails."""
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        proc, fired = self._proc, threading.Event()
        timer = threading.Timer(self.timeout_s + _KILL_GRACE_S, lambda: (fired.set(), proc.kill()))
        timer.start()
        try:
            request = marshal.dumps(sql)
            proc.stdin.write(len(request).to_bytes(8, "little") + request)
            proc.stdin.flush()
            header = proc.stdout.read(8)
            reply = marshal.loads(proc.stdout.read(int.from_bytes(header, "little"))) if len(header) == 8 else None
        except (OSError, EOFError, ValueError):
            reply = None
        finally:
            timer.cancel()
        if reply is None:
            self.close()
            raise _QueryFailed(f"query stopped after {self.timeout_s} s (timeout_s)" if fired.is_set()
                               else f"the query process ended (exit status {proc.poll()}; out of memory?)")
        if reply[0] != "ok":
            raise _QueryFailed(reply[1])
        return reply[1]

    def close(self) -> None:
        """Stop the child process (at once if it is still busy)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdin.close()
            proc.stdout.close()


@register_metric("sql_exec", options=("db", "timeout_s", "max_rows", "max_bytes"), required=("db",),
                 hint="db=<path of a SQLite database file>")
def sql_exec(name: str, preds: list[str], refs: list[list[str]], opts: dict) -> MetricResult:
    """Execution accuracy: run each predicted and gold query on ``db``; equal results score 1.

    Options: ``db`` (SQLite file, opened read-only); ``timeout_s`` (2.0 seconds per query; the query
    process is killed 1 s later if SQLite cannot stop the query itself); ``max_rows`` (10,000) and
    ``max_bytes`` (10,000,000: the size of any one string, blob or row, and of a whole result) cap a
    result. A predicted query that fails in any way (error, timeout, over a cap, several statements)
    scores 0 with the reason in its details; a failing gold query is a TunelabError naming the example.
    On Python 3.10 SQLite's length limit cannot be set: a huge value is built before the result cap
    rejects it, bounded by the query process's memory limit (Unix) and timeout.
    """
    timeout_s, max_rows, max_bytes = _sql_limits(opts)
    if not Path(opts["db"]).is_file():
        raise TunelabError(f"sql_exec metric: database {str(opts['db'])!r} not found; "
                           "pass db= the path of an existing SQLite file.")
    if not preds:
        return MetricResult(name, 0.0, [], [])
    runner = SqlProcess(opts["db"], timeout_s, max_rows, max_bytes)
    try:
        gold_cache = _run_gold(runner, refs, opts["db"])
        pred_rows: dict[str, list[tuple] | str] = {}

        def one(pred: str, gold: str) -> tuple[float, dict]:
            expected, ordered = gold_cache[gold]
            if pred not in pred_rows:  # several accepted golds: run the prediction once
                pred_rows.clear()
                pred_rows[pred] = _run_prediction(runner, pred)
            rows = pred_rows[pred]
            if isinstance(rows, str):
                return 0.0, {"error": rows}
            same = rows == expected if ordered else Counter(rows) == Counter(expected)
            return float(same), {"ordered": ordered, "rows": len(rows), "gold_rows": len(expected)}

        return per_example(name, preds, refs, one)
    finally:
        runner.close()


def _run_gold(runner: SqlProcess, refs: list[list[str]], db: Any) -> dict[str, tuple[list[tuple], bool]]:
    """Rows and orderedness of every gold query; a failing one is the dataset's mistake."""
    gold_cache: dict[str, tuple[list[tuple], bool]] = {}
    for i, accepted in enumerate(refs):
        for gold in accepted:
            if gold in gold_cache:
                continue
            query = _one_statement(gold)
            try:
                if query is None:
                    raise RuntimeError("multiple statements")
                gold_cache[gold] = (runner.run(query), has_top_level_order_by(query))
            except Exception as e:  # noqa: BLE001 - whatever it is, the reference is unusable
                raise TunelabError(f"sql_exec metric: the gold query of example {i} fails on {str(db)!r}: {e}. "
                                   f"Query: {gold!r}. Fix the dataset (or the database), or raise timeout_s, "
                                   "max_rows or max_bytes if the query is right.") from e
    return gold_cache


def _run_prediction(runner: SqlProcess, pred: str) -> list[tuple] | str:
    """The rows of a predicted query, or why it failed."""
    try:
        query = _one_statement(pred)
        return "multiple statements" if query is None else runner.run(query)
    except _QueryFailed as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - MemoryError, RecursionError, ...: the prediction is wrong, not the run
        return f"{type(e).__name__}: {e}"


