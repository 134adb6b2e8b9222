"""The dashboard's FastAPI app: HTML pages and a small JSON API over the run directories under ``roots``.

Routes: ``/`` (runs), ``/run/{id}`` (one run), ``/api/runs`` (the runs table as JSON), ``/api/metrics/{id}?after=N``
(the metrics records past the first N, and the run's status, which the run page polls while it trains),
``/launch`` with ``POST /api/plan``, ``POST /api/jobs``, ``GET /api/jobs``, ``POST /api/jobs/{n}/cancel`` (the
queue of ``ui.jobs``), ``/chat`` with ``POST /api/chat`` (``ui.chat``), ``/static/*``. An id that does not name a run inside the roots is a 404, whatever it holds (``..`` included).

Every request passes ``webguard.HostGuardMiddleware`` first: a ``Host`` other than an IP address, ``localhost``, the
bound name or an ``--allowed-host`` name is a 400 (DNS rebinding), and a POST whose ``Origin`` is not the dashboard
itself is a 403 (the page's own scripts send its Origin). What a launch may run: ``ui.launchrules``.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Iterable

from pydantic import BaseModel, Field

from tunelab.errors import TunelabError
from tunelab.ui import actions, pages
from tunelab.ui import runs as R
from tunelab.ui.launchrules import LaunchRules
from tunelab.webguard import HostGuard, HostGuardMiddleware


class LaunchRequest(BaseModel):
    preset: str | None = Field(None, max_length=4096)
    config_text: str | None = Field(None, max_length=1 << 20)  # the shared YAML loader's limit (safeyaml)
    overrides: str = Field("", max_length=1 << 16)


class DataRequest(BaseModel):
    path: str
    model: str
    example: int = 0


class ChatRequest(BaseModel):
    models: list[str]
    prompt: str
    system: str = ""
    max_new_tokens: int = 128


def _fastapi():
    try:
        import fastapi
        from fastapi.staticfiles import StaticFiles
    except ImportError:
        raise TunelabError("tunelab ui needs FastAPI and uvicorn; install them with: pip install 'tunelab[serve]'") from None
    return fastapi, StaticFiles


def create_app(folders: list[str | Path], host: str = "127.0.0.1", allowed_hosts: Iterable[str] = (),
               allow_code: bool = False, workdir: str | Path | None = None):
    """The app over the run directories found under ``folders`` (read on every request: new runs appear).

    Args:
        folders: The ``--runs`` folders.
        host: The address or name the dashboard is bound to (allowed as ``Host``).
        allowed_hosts: Further ``Host`` names to serve (``--allowed-host``).
        allow_code: Let launched configs name code (``--allow-code``; ``ui.launchrules``).
        workdir: Where presets are listed from (``configs/``) and jobs run; default the current directory.
    """
    fastapi, StaticFiles = _fastapi()
    from fastapi.responses import HTMLResponse

    roots = R.Roots.of(folders)
    rules = LaunchRules(roots.paths, Path(workdir or Path.cwd()).resolve(), allow_code)
    app = fastapi.FastAPI(title="tunelab ui", docs_url=None, redoc_url=None)
    app.add_middleware(HostGuardMiddleware, guard=HostGuard(host, allowed_hosts))
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")

    def rows():
        found = [(path, R.open_in(roots, path)) for path in R.find_runs(roots)]
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
        return {"status": R.status_of(run), "records": R.read_metrics(roots, run.path, max(after, 0))}

    _reports(app, fastapi, roots)
    _actions(app, fastapi, roots, rules)
    return app


def _reports(app, fastapi, roots: R.Roots) -> None:
    """Pipelines and compare sweeps (``ui.reports``)."""
    from fastapi.responses import FileResponse, HTMLResponse

    from tunelab.ui import reports

    @app.get("/reports", response_class=HTMLResponse)
    def reports_page() -> str:
        return reports.list_page(roots)

    @app.get("/report/{report_id:path}", response_class=HTMLResponse)
    def report_page(report_id: str) -> str:
        folder = reports.resolve(roots, report_id)
        if folder is None:
            raise fastapi.HTTPException(404, f"no pipeline or compare report {report_id!r} under the dashboard's folders")
        return reports.report_page(roots, report_id, folder)

    @app.get("/file/{report_id:path}/report-plots/{name}")
    def plot(report_id: str, name: str):
        path = reports.plot_file(roots, report_id, name)
        if path is None:
            raise fastapi.HTTPException(404, "no such plot")
        return FileResponse(path, media_type="image/svg+xml")


def _refused(fastapi, error: Exception):
    return fastapi.HTTPException(400, str(error))


def _actions(app, fastapi, roots: R.Roots, rules: LaunchRules) -> None:
    """The pages that act: launch (``ui.jobs``), and the chat and data pages, which load models (``ui.chat``)."""
    from tunelab.ui.chat import Chat
    from tunelab.ui.jobs import JobQueue

    _launch(app, fastapi, roots, JobQueue(rules))
    _models(app, fastapi, roots, Chat(roots))


def _launch(app, fastapi, roots: R.Roots, queue) -> None:
    from fastapi.responses import HTMLResponse

    def launched(request: LaunchRequest) -> tuple[str, list[str]]:
        try:
            return queue.config_file(request.preset, request.config_text), shlex.split(request.overrides)
        except (TunelabError, ValueError) as error:
            raise _refused(fastapi, error) from None

    def run_of(job) -> str | None:
        path = job.run_dir()
        try:
            return roots.run_id(path.resolve()) if path is not None else None
        except ValueError:  # an output_dir override outside the folders: not shown
            return None

    @app.get("/launch", response_class=HTMLResponse)
    def launch_page() -> str:
        return actions.launch_page(actions.presets(queue.rules.workdir))

    @app.post("/api/plan")
    def api_plan(request: LaunchRequest) -> dict:
        config, overrides = launched(request)
        try:
            ok, text = queue.plan(config, overrides)
        except TunelabError as error:
            raise _refused(fastapi, error) from None
        return {"ok": ok, "text": text}

    @app.post("/api/jobs")
    def api_submit(request: LaunchRequest) -> dict:
        config, overrides = launched(request)
        try:
            return queue.submit(config, overrides).view()
        except TunelabError as error:
            raise _refused(fastapi, error) from None

    @app.get("/api/jobs")
    def api_jobs() -> list[dict]:
        return [{**job.view(), "run": run_of(job)} for job in queue.jobs]

    @app.post("/api/jobs/{job_id}/cancel")
    def api_cancel(job_id: int) -> dict:
        try:
            return queue.cancel(job_id).view()
        except KeyError:
            raise fastapi.HTTPException(404, f"no job {job_id}") from None


def _models(app, fastapi, roots: R.Roots, chat) -> None:
    from fastapi.responses import HTMLResponse

    @app.get("/data", response_class=HTMLResponse)
    def data_page() -> str:
        from tunelab.ui.datapage import data_page

        return data_page(chat.tokenizer_models())

    @app.post("/api/data")
    def api_data(request: DataRequest) -> dict:
        from tunelab.ui.datapage import inspect_file

        if request.model not in chat.tokenizer_models():
            raise fastapi.HTTPException(400, f"{request.model!r}: not the embedded model or a base of a run here")
        try:
            return inspect_file(request.path, roots.paths, request.model, request.example)
        except TunelabError as error:
            raise _refused(fastapi, error) from None

    @app.get("/chat", response_class=HTMLResponse)
    def chat_page() -> str:
        return actions.chat_page(chat.choices())

    @app.post("/api/chat")
    def api_chat(request: ChatRequest) -> dict:
        try:
            return {"answers": [chat.answer(m, request.prompt, request.max_new_tokens, request.system) for m in request.models if m]}
        except TunelabError as error:
            raise _refused(fastapi, error) from None
