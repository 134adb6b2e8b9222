"""What the launch page may start: which configs, where a run may write, whether it may run code of its choosing.

The dashboard starts ``tunelab train`` as the user who started it, so besides ``webguard.HostGuard`` (which keeps
other sites' pages away from the routes), every launched config is confined:

- **Presets** (``LaunchRequest.preset``): ``demo``, a YAML file under the shipped preset folder (``configs/`` of the
  dashboard's working directory: what the page lists), or a YAML file inside the dashboard's ``--runs`` folders.
  Any other path on disk is refused; a config from elsewhere can still be pasted.
- **Writes**: the run's ``output_dir`` (the config's, after the overrides; relative paths from the working
  directory, links followed) must lie inside a ``--runs`` folder, and so must a local MLflow ``tracking_uri``
  (a plain path, ``file:`` or ``sqlite:``; a server URI is left as given).
- **Code**: without ``tunelab ui --allow-code``, a config that would import or run code it names is refused: a
  ``module:function`` metric (``eval.metric``), a ``module:function`` entry among the recipe's or method's options
  (``recipe.rewards[].fn`` and any ``fn``, ``metric``, ``loss``, ``function`` key), and ``model.trust_remote_code``.
- **Reads** (data, eval files, databases, the model, ``init_from``) are not confined: ``tunelab train`` only reads
  them, and what it makes of them lands inside the folders, shown to the dashboard's own pages only.

Every config (a preset, a pasted one, the demo's overrides) is read by the shared loader (``tunelab.resolve.load_config``:
its YAML limits, validation with file:line) here, before ``tunelab plan`` or a job sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tunelab.errors import TunelabError

DEMO = "demo"  # the preset that runs `tunelab demo` (it builds its database itself), planned with its job as a config
CODE_KEYS = frozenset({"fn", "metric", "loss", "function"})  # option keys whose 'module:function' value imports code
YAML_SUFFIXES = (".yaml", ".yml")


def _inside(path: Path, places: tuple[Path, ...], strictly: bool = False) -> bool:
    """Whether ``path`` (already resolved) is one of ``places`` (unless ``strictly``) or lies below one."""
    return any(place in path.parents or (not strictly and path == place) for place in places)


@dataclass(frozen=True)
class LaunchRules:
    """The rules above for one dashboard.

    Args:
        roots: The ``--runs`` folders, resolved.
        workdir: The dashboard's working directory: relative paths of a config resolve from it, jobs run in it.
        allow_code: ``--allow-code``: let configs name code (``module:function``, ``trust_remote_code``).
    """

    roots: tuple[Path, ...]
    workdir: Path
    allow_code: bool = False

    @property
    def preset_folders(self) -> tuple[Path, ...]:
        return ((self.workdir / "configs").resolve(),)

    def _path(self, text: str) -> Path:
        return (self.workdir / Path(text).expanduser()).resolve()

    def preset(self, name: str) -> str:
        """The config file a preset names (absolute), or ``demo``; a TunelabError for any other path."""
        if name == DEMO:
            return DEMO
        path = self._path(name)
        if path.suffix not in YAML_SUFFIXES or not _inside(path, self.preset_folders + self.roots, strictly=True):
            raise TunelabError(f"preset {name!r}: not one of the listed presets ({self.preset_folders[0]}) nor a YAML "
                               "file inside the dashboard's --runs folders; pick one from the list, put the file "
                               "under --runs, or paste the config")
        if not path.is_file():
            raise TunelabError(f"preset {name}: no such config file")
        return str(path)

    def check(self, config: str | None, overrides: list[str]) -> None:
        """Load ``config`` with ``overrides`` as ``tunelab train`` will, and refuse what the rules do not allow.

        Raises:
            TunelabError: The loader's problems (``ConfigError``), or every rule the config breaks, one per line.
        """
        from tunelab.resolve import load_config

        loaded = load_config(config, overrides)
        problems = self._writes(loaded)
        if not self.allow_code:
            problems += [f"{where}: {what}; the dashboard runs no code a config names unless started with "
                         "`tunelab ui --allow-code` (or run it yourself: tunelab train)" for where, what in code_in(loaded)]
        if problems:
            raise TunelabError("the dashboard will not launch this config:\n" + "\n".join(f"- {p}" for p in problems))

    def _writes(self, loaded) -> list[str]:
        problems = []
        roots = ", ".join(map(str, self.roots))
        if not _inside(self._path(loaded.output_dir), self.roots, strictly=True):
            problems.append(f"output_dir {loaded.output_dir}: outside the dashboard's folders ({roots}); leave it out "
                            "(the run goes to a new ui-STAMP folder there) or name a folder inside them")
        local = _local_tracking(loaded.tracking_uri)
        if local is not None and not _inside(self._path(local), self.roots, strictly=True):
            problems.append(f"tracking_uri {loaded.tracking_uri}: a local MLflow store outside the dashboard's folders "
                            f"({roots}); leave it out (mlflow.db beside output_dir) or name a path inside them")
        return problems


def _local_tracking(uri: str | None) -> str | None:
    """The local path an MLflow tracking URI writes to, or None (not set, or a server)."""
    if not uri:
        return None
    parts = urlsplit(uri)
    if parts.scheme == "sqlite":
        return uri.split(":///", 1)[1] if ":///" in uri else uri.removeprefix("sqlite:")
    if parts.scheme == "file":
        return parts.path or uri.removeprefix("file:")
    return uri if parts.scheme in ("",) or len(parts.scheme) == 1 else None  # a path, or a Windows drive letter


def code_in(loaded) -> list[tuple[str, str]]:
    """(config key, why) of each place ``loaded`` (a ``RunConfig``) names code to import or run."""
    found = []
    if ":" in loaded.eval.metric:
        found.append(("eval.metric", f"{loaded.eval.metric!r} imports a module:function metric"))
    if loaded.model.trust_remote_code:
        found.append(("model.trust_remote_code", "true runs Python code shipped with the model"))
    for section, options in (("recipe", loaded.recipe.options()), ("method", loaded.method.options()),
                             ("eval", dict(loaded.eval.model_extra or {}))):
        found += [(f"{section}.{key}", f"{value!r} imports a module:function") for key, value in _code_refs(options)]
    return found


def _code_refs(tree: Any, prefix: str = "", seen: set[int] | None = None) -> list[tuple[str, str]]:
    """(key path, value) of each ``CODE_KEYS`` key holding a 'module:function' string; a mapping or list YAML
    shares between places (an alias) is looked at once."""
    seen = set() if seen is None else seen
    if not isinstance(tree, (dict, list)) or id(tree) in seen:
        return []
    seen.add(id(tree))
    if isinstance(tree, list):
        return [ref for n, item in enumerate(tree) for ref in _code_refs(item, f"{prefix}[{n}]", seen)]
    found = []
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key in CODE_KEYS and isinstance(value, str) and ":" in value:
            found.append((path, value))
        else:
            found += _code_refs(value, path, seen)
    return found
