"""Experiment tracking: the only module that imports mlflow.

Everything else talks to a :class:`Tracker` (an explicit client + run id, never MLflow's global active run), so
several runs (a suite's parent and its children, Optuna trials in worker processes) can be open at once.
:class:`NullTracker` serves tests and ``--no-track`` runs that need no store.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import yaml

PARENT_TAG = "mlflow.parentRunId"
TRACKED_PACKAGES = ("torch", "torchvision", "numpy", "scipy", "mlflow", "optuna", "torchio", "nibabel", "lpips",
                    "scikit-learn", "scikit-image")


@dataclass(frozen=True)
class TrackingSettings:
    """What ``mlflow.yaml`` sets; ``MLFLOW_TRACKING_URI`` in the environment wins, as in MLflow itself."""

    tracking_uri: str = "sqlite:///mlruns.db"
    artifact_location: str = ""
    experiment_prefix: str = "brainmri"
    system_metrics: bool = False

    @classmethod
    def load(cls, path: str | Path = "mlflow.yaml") -> TrackingSettings:
        data: dict[str, Any] = {}
        if Path(path).is_file():
            data = yaml.safe_load(Path(path).read_text()) or {}
        known = {k: data[k] for k in ("tracking_uri", "artifact_location", "experiment_prefix", "system_metrics")
                 if k in data}
        settings = cls(**known)
        env_uri = os.environ.get("MLFLOW_TRACKING_URI")
        if env_uri:
            settings = cls(**{**settings.__dict__, "tracking_uri": env_uri})
        return settings

    def experiment_name(self, suite: str) -> str:
        return f"{self.experiment_prefix}/{suite}" if self.experiment_prefix else suite


class Tracker(Protocol):
    run_id: str | None

    def child(self, name: str, tags: dict[str, str] | None = None) -> Tracker: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def log_dataset(self, table: Any, name: str, source: str, digest: str, context: str = "training") -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def provenance_tags() -> dict[str, str]:
    """Tags every run carries: git commit and package versions."""
    tags = {"git_commit": git_commit()}
    tags.update({f"version.{k}": v for k, v in package_versions().items()})
    return tags


class NullTracker:
    """Records nothing beyond memory (tests inspect ``metrics``); children are NullTrackers too."""

    def __init__(self, name: str = "null") -> None:
        self.run_id: str | None = None
        self.name = name
        self.params: dict[str, Any] = {}
        self.tags: dict[str, Any] = {}
        self.metrics: dict[str, list[tuple[int | None, float]]] = {}
        self.artifacts: list[str] = []
        self.datasets: list[tuple[str, str, str]] = []
        self.status = "RUNNING"

    def child(self, name: str, tags: dict[str, str] | None = None) -> NullTracker:
        child = NullTracker(name)
        child.tags.update(tags or {})
        return child

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tags.update(tags)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step, float(v)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(str(Path(artifact_path or "") / Path(path).name))

    def log_text(self, text: str, name: str) -> None:
        self.artifacts.append(name)

    def log_dataset(self, table: Any, name: str, source: str, digest: str, context: str = "training") -> None:
        self.datasets.append((name, digest, context))

    def finish(self, status: str = "FINISHED") -> None:
        self.status = status


class MlflowTracker:
    """One MLflow run addressed by id through an explicit :class:`mlflow.MlflowClient`."""

    def __init__(self, client: Any, run_id: str, experiment_id: str) -> None:
        self.client = client
        self.run_id: str | None = run_id
        self.experiment_id = experiment_id
        self._system_monitor: Any = None

    @classmethod
    def start(
        cls,
        experiment: str,
        run_name: str,
        tags: dict[str, str] | None = None,
        settings: TrackingSettings | None = None,
        parent_run_id: str | None = None,
    ) -> MlflowTracker:
        from mlflow import MlflowClient

        settings = settings or TrackingSettings.load()
        client = MlflowClient(tracking_uri=settings.tracking_uri)
        experiment_id = _get_or_create_experiment(client, settings.experiment_name(experiment),
                                                  settings.artifact_location)
        all_tags = {**provenance_tags(), **(tags or {})}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        tracker = cls(client, run.info.run_id, experiment_id)
        if settings.system_metrics:
            tracker._start_system_metrics(settings.tracking_uri)
        return tracker

    @classmethod
    def attach(cls, run_id: str, settings: TrackingSettings | None = None) -> MlflowTracker:
        """Reopen an existing run (resume) and mark it running again."""
        from mlflow import MlflowClient

        settings = settings or TrackingSettings.load()
        client = MlflowClient(tracking_uri=settings.tracking_uri)
        run = client.get_run(run_id)
        client.update_run(run_id, status="RUNNING")
        return cls(client, run_id, run.info.experiment_id)

    def _start_system_metrics(self, tracking_uri: str) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._system_monitor = SystemMetricsMonitor(self.run_id, resume_logging=False)
            self._system_monitor.start()
        except Exception:  # noqa: BLE001 - optional (needs psutil); never fail a run over it
            self._system_monitor = None

    def child(self, name: str, tags: dict[str, str] | None = None) -> MlflowTracker:
        all_tags = {**provenance_tags(), **(tags or {}), PARENT_TAG: self.run_id}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        return MlflowTracker(self.client, run.info.run_id, self.experiment_id)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        existing = self.client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in existing]  # params are immutable; resume re-logs them
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self.log_text(json.dumps(data, indent=2, sort_keys=True, default=str), name)

    def log_dataset(self, table: Any, name: str, source: str, digest: str, context: str = "training") -> None:
        """The run's data as an MLflow dataset input (the runs table's Dataset column): ``table`` a DataFrame (one
        row per scan: subject, split, clinical vector), ``name``/``digest`` naming cohort and split."""
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():
            # MLflow registers LocalArtifactDatasetSource twice, so every local path "can be interpreted in multiple
            # ways" (the two candidates are the same class); the warning says nothing about our data.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted",
                                    category=UserWarning)
            dataset = mlflow.data.from_pandas(table, source=source, name=name, digest=digest)
        entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])
        self.client.log_inputs(self.run_id, datasets=[entity])

    def finish(self, status: str = "FINISHED") -> None:
        if self._system_monitor is not None:
            self._system_monitor.finish()
        self.client.set_terminated(self.run_id, status=status)


def log_generator_model(tracker: Any, data: Path, spec: dict[str, Any], artifact_path: str = "generator") -> None:
    """Log a generator folder (benchmark/generator_model.py) as an MLflow pyfunc model at ``artifact_path`` of the
    tracker's run, with its signature: ``mlflow.pyfunc.load_model("runs:/<id>/generator")`` then works without the
    CLI (with this repository importable). A NullTracker logs nothing."""
    if not isinstance(tracker, MlflowTracker):
        return
    import mlflow.pyfunc
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([ColSpec(kind, name) for name, kind in spec["inputs"]]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), tuple(spec["output_shape"]), "volumes")]),
        params=ParamSchema([ParamSpec(name, kind, default) for name, kind, default in spec["params"]]))
    # explicit requirements: MLflow's inference would import-trace the model (seconds per run)
    requirements = []
    for name in ("torch", "numpy", "pandas", "mlflow"):
        try:
            requirements.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    with tempfile.TemporaryDirectory(prefix="bm-pyfunc-") as tmp, warnings.catch_warnings():
        # no input example on purpose: MLflow would load the model and generate from it at save time
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        folder = Path(tmp) / artifact_path
        mlflow.pyfunc.save_model(str(folder), loader_module="benchmark.generator_model", data_path=str(data),
                                 signature=signature, pip_requirements=requirements)
        tracker.client.log_artifacts(tracker.run_id, str(folder), artifact_path)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:6000]


def _get_or_create_experiment(client: Any, name: str, artifact_location: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location or None)
    except Exception:  # noqa: BLE001 - another worker created it first (race between processes)
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


# --- reading back (reports, resume, suite reuse) -------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    name: str
    status: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]


def find_runs(experiment: str | None, filter_string: str = "", settings: TrackingSettings | None = None
              ) -> list[RunRecord]:
    """Runs matching an MLflow filter string, newest first; ``experiment=None`` searches every experiment."""
    from mlflow import MlflowClient

    settings = settings or TrackingSettings.load()
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    if experiment is None:
        ids = [e.experiment_id for e in client.search_experiments()]
    else:
        exp = client.get_experiment_by_name(settings.experiment_name(experiment))
        ids = [exp.experiment_id] if exp is not None else []
    if not ids:
        return []
    runs = client.search_runs(ids, filter_string=filter_string, order_by=["attributes.start_time DESC"],
                              max_results=5000)
    return [RunRecord(r.info.run_id, r.info.run_name or "", r.info.status, dict(r.data.tags), dict(r.data.params),
                      dict(r.data.metrics)) for r in runs]


def metric_history(run_id: str, key: str, settings: TrackingSettings | None = None) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    settings = settings or TrackingSettings.load()
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def download_artifact(run_id: str, path: str, settings: TrackingSettings | None = None) -> Path:
    """A run's artifact in a fresh temporary folder; :class:`StoreError` for an unknown run or a missing artifact."""
    import shutil

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from benchmark.errors import StoreError

    settings = settings or TrackingSettings.load()
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise StoreError(f"run id {run_id!r}: no such run in the tracking store {settings.tracking_uri}") from None
    folder = tempfile.mkdtemp(prefix="bm-artifact-")
    try:
        return Path(client.download_artifacts(run_id, path, folder))
    except (MlflowException, OSError):
        shutil.rmtree(folder, ignore_errors=True)
        raise StoreError(f"run {run_id}: no artifact {path!r} (only a run that finished its evaluation has one)"
                         ) from None


# Exceptions that mean "this store cannot be used" (besides MlflowException): a URI SQLAlchemy cannot parse or
# connect to, a missing database driver, a file store in a folder that cannot be written.
_STORE_FAILURES: tuple[type[BaseException], ...] = (OSError, ImportError)
try:
    from sqlalchemy.exc import SQLAlchemyError

    _STORE_FAILURES += (SQLAlchemyError,)
except ImportError:  # pragma: no cover - sqlalchemy comes with mlflow
    pass


# URI schemes an MLflow tracking store can have ("" = a local folder).
STORE_SCHEMES = ("", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
                 "databricks-uc", "uc")


def _store_creation_lock(uri: str) -> Any:
    """A file lock beside a SQLite store (``<db>.lock``): two processes that open a new store at once would both run
    its schema migrations (alembic then fails in one of them); with the lock the second finds the store made."""
    import contextlib

    path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    if path is None or not path.parent.is_dir():
        return contextlib.nullcontext()
    from filelock import FileLock

    return FileLock(f"{path}.lock")


def check_store(settings: TrackingSettings | None = None, timeout_s: float = 5.0) -> None:
    """One cheap query against the tracking store, so that a malformed or unreachable URI is one line
    (:class:`StoreError`) before any work, not a traceback after it. An HTTP server is first probed with a plain TCP
    connection (MLflow itself retries for minutes). Creating a new SQLite store (first use) happens here."""
    import logging
    import socket
    from urllib.parse import urlsplit

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from benchmark.errors import StoreError

    settings = settings or TrackingSettings.load()
    uri = settings.tracking_uri
    where = f"MLflow tracking URI {uri!r}"
    scheme = urlsplit(uri).scheme.split("+")[0]
    if scheme not in STORE_SCHEMES:
        raise StoreError(f"{where}: unknown scheme {scheme!r} (use sqlite:///FILE.db, a folder, http(s)://HOST:PORT "
                         "or a database URL such as postgresql://...)")
    if uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            socket.create_connection((parts.hostname or "", port), timeout=timeout_s).close()
        except (OSError, ValueError) as err:
            raise StoreError(f"{where}: cannot reach the server ({getattr(err, 'strerror', None) or err})") from None
    # MLflow logs the creation of a new SQLite store at INFO on stderr; a first run needs no news of it.
    quiet = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic.runtime.migration")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.WARNING)
    try:
        with _store_creation_lock(uri):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except (MlflowException, *_STORE_FAILURES) as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__).strip()
        raise StoreError(f"{where} cannot be used (set tracking_uri in mlflow.yaml or MLFLOW_TRACKING_URI): "
                         f"{first[:300]}") from None
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
