"""Methods from outside the repository: installed entry points, ``--plugin MODULE_OR_FILE`` and ``BENCHMARK_PLUGINS``.

A plugin is a Python module that registers methods into :data:`benchmark.registry.METHODS` when imported, exactly as
the built-in modules of :mod:`benchmark.catalog` do (``@METHODS.register("mymethod")`` on a
:class:`models.base.GenerativeMethod` subclass; docs/METHODS.md). It is found in one of three ways, loaded in this
order after the built-in modules:

1. an installed distribution's entry point in the group ``brainmri.methods`` (in its pyproject.toml:
   ``[project.entry-points."brainmri.methods"] mymethod = "mypackage.mymethod"``; that module is imported);
2. ``BENCHMARK_PLUGINS``: module names or ``.py`` files, separated by ``os.pathsep``;
3. ``--plugin MODULE_OR_FILE`` (repeatable) on every command that builds methods; the CLI appends these to
   ``BENCHMARK_PLUGINS``, so the processes a command starts (Optuna workers, ``torchrun`` ranks) load them too.

A plugin's methods get the same treatment as built-in ones (suites, tuning, tags, digests, resume); their child runs
carry the tags ``plugin`` (where the method came from) and ``plugin_version`` (the distribution's version, or the
sha256 of the file). A plugin that fails to import, or registers a name that is already taken, is a one-line
:class:`PluginError` naming the plugin.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from benchmark.errors import UsageError
from benchmark.registry import METHODS

ENTRY_POINT_GROUP = "brainmri.methods"
ENV_VAR = "BENCHMARK_PLUGINS"


class PluginError(UsageError):
    """A plugin that cannot be imported or whose method names are already registered (one line, exit code 2)."""


@dataclass(frozen=True)
class Plugin:
    """Where a plugin came from: ``source`` is the entry point (``dist:name = module``), module name or file path."""

    source: str
    version: str
    methods: tuple[str, ...]


_LOADED: dict[str, Plugin] = {}  # key: resolved file path, module name or entry point -> what it registered
_METHOD_PLUGIN: dict[str, Plugin] = {}
_ENTRY_POINTS: list[metadata.EntryPoint] | None = None


def plugin_of(method: str) -> Plugin | None:
    """The plugin that registered ``method``, or None for a built-in method."""
    return _METHOD_PLUGIN.get(method)


def plugin_tags(method: str) -> dict[str, str]:
    """``{"plugin": ..., "plugin_version": ...}`` for a plugin method, ``{}`` for a built-in one."""
    plugin = plugin_of(method)
    return {"plugin": plugin.source, "plugin_version": plugin.version} if plugin else {}


def env_specs() -> list[str]:
    return [s for s in os.environ.get(ENV_VAR, "").split(os.pathsep) if s.strip()]


def add_to_env(specs: list[str]) -> None:
    """Append ``specs`` to ``BENCHMARK_PLUGINS`` (as absolute paths for files), for the processes a command starts."""
    current = env_specs()
    for spec in specs:
        spec = _absolute(spec)
        if spec not in current:
            current.append(spec)
    os.environ[ENV_VAR] = os.pathsep.join(current)


def load_plugins(specs: list[str] | tuple[str, ...] = ()) -> list[Plugin]:
    """Import the installed entry points, then ``BENCHMARK_PLUGINS``, then ``specs``; each at most once a process.

    Built-in methods must be registered first (:func:`benchmark.catalog.load_all` calls this after them), so that a
    plugin reusing a built-in name is reported as a clash instead of shadowing it.
    """
    global _ENTRY_POINTS
    if _ENTRY_POINTS is None:  # scanned once a process: load_all() runs before every method is built
        _ENTRY_POINTS = _entry_points()
    out = []
    for ep in _ENTRY_POINTS:
        dist = getattr(ep, "dist", None)
        source = f"{dist.name if dist else '?'}:{ep.name} = {ep.value}"
        version = dist.version if dist else ""
        out.append(_load(source, source, lambda ep=ep: ep.load(), version))
    for spec in [*env_specs(), *specs]:
        key = _absolute(spec)
        if _is_file(spec):
            path = Path(key)
            out.append(_load(key, str(path), lambda path=path: _import_file(path), _file_version(path)))
        else:
            out.append(_load(key, spec, lambda spec=spec: importlib.import_module(spec), _module_version(spec)))
    return out


def _entry_points() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: (ep.name, ep.value))


def _is_file(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or (os.altsep is not None and os.altsep in spec)


def _absolute(spec: str) -> str:
    return str(Path(spec).expanduser().resolve()) if _is_file(spec) else spec


def _load(key: str, source: str, do_import: object, version: str) -> Plugin:
    if key in _LOADED:
        return _LOADED[key]
    before = set(METHODS)
    try:
        do_import()  # type: ignore[operator]
    except KeyError as err:
        if "registered twice" in str(err):  # Registry.register refused a name that is taken
            raise PluginError(f"plugin {source}: {_clash(err)}") from None
        raise PluginError(f"plugin {source} failed to import (KeyError: {err})") from None
    except Exception as err:  # noqa: BLE001 - whatever a foreign module raises on import is the plugin's failure
        what = f"{type(err).__name__}: {err}".strip().replace("\n", " ")
        raise PluginError(f"plugin {source} failed to import ({what[:400]})") from None
    plugin = Plugin(source, version, tuple(m for m in METHODS if m not in before))
    _LOADED[key] = plugin
    for method in plugin.methods:
        _METHOD_PLUGIN[method] = plugin
    return plugin


def _clash(err: KeyError) -> str:
    text = str(err.args[0]) if err.args else str(err)  # "<kind> '<name>' registered twice"
    kind, _, rest = text.partition(" ")
    name = rest.split("'")[1] if rest.count("'") >= 2 else rest
    owner = plugin_of(name) if kind == "method" else None
    where = f" by plugin {owner.source}" if owner else " by a built-in module" if kind == "method" else ""
    return f"{kind} {name!r} is already registered{where}; give the plugin's {kind} another name"


def _import_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"no such file {path}")
    # A stable module name per file, registered in sys.modules (pickling, dataclasses and torch need it there).
    name = f"brainmri_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path} as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise


def _file_version(path: Path) -> str:
    try:
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except OSError:
        return ""


def _module_version(name: str) -> str:
    top = name.split(".")[0]
    for dist in metadata.packages_distributions().get(top, []):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return ""
