"""Built-in environments for agentic GRPO (the contract is in :mod:`tunelab.rewards.environment`).

* ``tunelab.rewards.tool_envs:PythonTools`` with ``environment_options: {module: my_tools}``: every public
  function of the module is a tool, its schema read from its signature.
* ``tunelab.rewards.tool_envs:ShopSql``: one tool, ``run_sql(query)``, over the example shop database
  (:mod:`tunelab.examples.sql`), executed read-only in the sandboxed query process the ``sql_exec`` metric uses
  (a time limit per query, capped rows and bytes). ``db`` names another SQLite file.
"""

from __future__ import annotations

import importlib
import inspect
import tempfile
from pathlib import Path

from tunelab.rewards.environment import ToolEnvironment


class PythonTools(ToolEnvironment):
    """Tools from a module's public functions (those defined in it, not imported into it)."""

    def __init__(self, module: str):
        mod = importlib.import_module(module)
        self.functions = {name: fn for name, fn in vars(mod).items()
                          if inspect.isfunction(fn) and not name.startswith("_") and fn.__module__ == mod.__name__}
        if not self.functions:
            raise ValueError(f"module {module!r} defines no public function to serve as a tool")


class ShopSql(ToolEnvironment):
    """``run_sql`` over the shop database, read-only and sandboxed; results as at most ``max_rows`` lines."""

    def __init__(self, db: str | None = None, timeout_s: float = 2.0, max_rows: int = 20):
        from tunelab.evaluation.sql_exec import SqlProcess
        from tunelab.examples.sql.task import build_database

        if db is None:
            db = Path(tempfile.gettempdir()) / "tunelab-shop.sqlite"
            if not db.is_file():
                build_database(db)
        elif not Path(db).is_file():
            raise ValueError(f"database {str(db)!r} not found; build it first (the SFT SQL demo does) or leave db unset")
        self.max_rows = max_rows
        self._sql = SqlProcess(db, timeout_s, max_rows=10_000, max_bytes=1_000_000)
        self.functions = {"run_sql": self.run_sql}

    def run_sql(self, query: str) -> str:
        """Run one read-only SQLite query on the shop database and return its rows.

        Tables: products(id, name, category, price, stock), customers(id, name, city),
        orders(id, customer_id, product_id, quantity, day)."""
        rows = self._sql.run(query)
        shown = "\n".join(", ".join(map(str, row)) for row in rows[: self.max_rows])
        more = f"\n... {len(rows) - self.max_rows} more rows" if len(rows) > self.max_rows else ""
        return (shown or "(no rows)") + more

    def close(self) -> None:
        self._sql.close()
