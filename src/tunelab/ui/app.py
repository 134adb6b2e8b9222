"""The dashboard's FastAPI app: HTML pages and a small JSON API over the run directories under ``roots``.

Routes: ``/`` (runs), ``/run/{id}`` (one run), ``/api/runs`` (the runs table as JSON), ``/api/metrics/{id}?after=N``
(the metrics records past the first N, and the run's status, which the run page polls while it trains),
``/static/*``. An id that does not name a run inside the roots is a 404, whatever it holds (``..`` included).
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.ui import pages
from tunelab.ui import runs as R


def _fastapi():
    try:
        import fastapi
        from fastapi.staticfiles import StaticFiles
    except ImportError:
        raise TunelabError("tunelab ui needs FastAPI and uvicorn; install them with: pip install 'tunelab[serve]'") from None
    return fastapi, StaticFiles


def create_app(folders: list[str | Path]):
    """The app over the run directories found under ``folders`` (read on every request: new runs appear)."""
    fastapi, StaticFiles = _fastapi()
    from fastapi.responses import HTMLResponse

    roots = R.Roots.of(folders)
    app = fastapi.FastAPI(title="tunelab ui", docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")

    def rows():
        found = [(path, R.open_run(path)) for path in R.find_runs(roots)]
        return [R.summary(run, roots.run_id(path)) for path, run in found if run is not None]

    def one(run_id: str):
        run = R.load(roots, run_id)
        if run is None:
            raise fastapi.HTTPException(404, f"no run {run_id!r} under the dashboard's folders")
        return run

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return pages.runs_page(rows())

    @app.get("/run/{run_id:path}", response_class=HTMLResponse)
    def run_page(run_id: str) -> str:
        return pages.run_page(one(run_id), run_id)

    @app.get("/api/runs")
    def api_runs() -> list[dict]:
        return rows()

    @app.get("/api/metrics/{run_id:path}")
    def api_metrics(run_id: str, after: int = 0) -> dict:
        run = one(run_id)
        return {"status": R.status_of(run), "records": R.read_metrics(run.path, max(after, 0))}

    return app
