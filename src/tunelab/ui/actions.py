"""The dashboard's pages that act: launch a training run, and chat with a model (HTML; ``static/app.js`` drives them)."""

from __future__ import annotations

from html import escape
from pathlib import Path

from tunelab.ui.pages import page


def presets(workdir: Path = Path(".")) -> list[str]:
    """The run configs shipped in the working directory (``configs/**/*.yaml``, as relative paths), pipelines left
    out: the presets ``ui.launchrules`` lets the page launch."""
    folder = Path(workdir) / "configs"
    if not folder.is_dir():
        return []
    return sorted(p.relative_to(workdir).as_posix() for p in folder.rglob("*.yaml") if not p.name.startswith("pipeline"))


def launch_page(preset_paths: list[str]) -> str:
    options = "<option value=\"demo\">the demo (tunelab demo: text-to-SQL, LoRA, minutes on a CPU)</option>"
    options += "".join(f"<option>{escape(p)}</option>" for p in preset_paths)
    body = ("<h1>Launch a training run</h1><form id=\"launch\" onsubmit=\"return false\">"
            f"<p><label>preset <select id=\"preset\"><option value=\"\">(paste a config below)</option>{options}</select></label></p>"
            "<p><textarea id=\"config-text\" rows=\"8\" cols=\"90\" placeholder=\"or paste a config (YAML)\"></textarea></p>"
            "<p><label>overrides <input id=\"overrides\" size=\"70\" placeholder=\"train.max_steps=20 method.r=8\"></label></p>"
            "<p><button id=\"check\" type=\"button\">Check (tunelab plan)</button> "
            "<button id=\"start\" type=\"button\" disabled>Start</button></p></form>"
            "<pre id=\"plan\"></pre><h2>Jobs</h2><p>One at a time; the run appears on the runs page as it starts.</p>"
            "<table id=\"jobs\"><thead><tr><th>job</th><th>config</th><th>status</th><th>progress</th><th>run</th><th></th></tr></thead>"
            "<tbody></tbody></table><pre id=\"job-log\"></pre>")
    return page("Launch", body)


def chat_page(choices: list[dict]) -> str:
    options = "".join(f"<option value=\"{escape(c['id'])}\">{escape(c['label'])}</option>" for c in choices)
    none = "<option value=\"\">(none)</option>"
    body = ("<h1>Chat</h1><p>A finished run answers as <code>tunelab eval</code> loads it (greedy); pick a second model "
            "to compare them on the same prompt.</p><form id=\"chat\" onsubmit=\"return false\">"
            f"<p><label>model <select id=\"model-a\">{options}</select></label> "
            f"<label>beside it <select id=\"model-b\">{none}{options}</select></label></p>"
            "<p><textarea id=\"system\" rows=\"2\" cols=\"90\" placeholder=\"system prompt (optional)\"></textarea></p>"
            "<p><textarea id=\"prompt\" rows=\"4\" cols=\"90\" placeholder=\"ask something\"></textarea></p>"
            "<p><button id=\"send\" type=\"button\">Send</button> <span id=\"chat-status\"></span></p></form>"
            "<div class=\"answers\"><div><h3 id=\"label-a\"></h3><pre id=\"answer-a\"></pre></div>"
            "<div><h3 id=\"label-b\"></h3><pre id=\"answer-b\"></pre></div></div>")
    return page("Chat", body)
