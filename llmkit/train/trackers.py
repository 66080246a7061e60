"""Experiment trackers besides TensorBoard: W&B, MLflow and Trackio, through Accelerate's tracker classes.

llmkit writes TensorBoard itself (a resumed run purges the steps after its checkpoint there); the others are the
libraries' own clients, configured as their users expect: W&B by WANDB_MODE / WANDB_PROJECT and its login, MLflow
by MLFLOW_TRACKING_URI (default: a local database, RUN/mlflow.db), Trackio by TRACKIO_DIR. A resumed run continues the
same tracker runs (their ids are kept in RUN/trackers.json); the steps after the checkpoint are logged again.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llmkit.atomic import write_json
from llmkit.console import info
from llmkit.errors import UserError

TRACKERS = ("wandb", "mlflow", "trackio")  # each is also the name of its library


def check_trackers(report_to: Sequence[str]) -> None:
    """One line, before any work, for a tracker whose library is not installed."""
    for name in report_to:
        if name in TRACKERS and importlib.util.find_spec(name) is None:
            raise UserError(
                f"logging.report_to: {name} is not installed; pip install 'llmkit[trackers]' (or {name}), "
                f"or leave {name} out"
            )


def open_trackers(
    report_to: Sequence[str], run_dir: Path, project: str, config: dict[str, Any], resume: bool
) -> list[Any]:
    """Start each tracker, continuing its earlier run on a resume, and log the run's config to it."""
    names = [name for name in report_to if name in TRACKERS]
    if not names:
        return []
    check_trackers(names)
    ids_path = run_dir / "trackers.json"
    ids = json.loads(ids_path.read_text(encoding="utf-8")) if resume and ids_path.is_file() else {}
    trackers = []
    for name in names:
        tracker = _build(name, run_dir, project, ids.get(name))
        with quiet_library(), _one_line(name):
            tracker.start()
            if not (name == "mlflow" and ids.get(name)):  # MLflow params are write-once; a resume keeps the first
                tracker.store_init_configuration(config)
        ids[name] = _run_id(name, tracker)
        info(f"{name}: {_where(name, tracker)}")
        trackers.append(tracker)
    write_json(ids_path, ids)
    return trackers


def finish_trackers(trackers: list[Any]) -> None:
    for tracker in trackers:
        with quiet_library():
            tracker.finish()


@contextlib.contextmanager
def _one_line(name: str) -> Iterator[None]:
    """A tracker that cannot start (a bad MLFLOW_TRACKING_URI, no W&B login without WANDB_MODE=offline, ...) is the
    user's settings: one line with the library's own reason."""
    try:
        yield
    except Exception as exc:  # each library raises its own types; none of them is llmkit's bug
        reason = " ".join(str(exc).split())[:300]
        raise UserError(
            f"logging.report_to: {name} could not start ({type(exc).__name__}: {reason}); fix its settings or "
            f"leave {name} out (the run can continue with --resume auto)"
        ) from None


@contextlib.contextmanager
def quiet_library() -> Iterator[None]:
    """The trackers' banners and tables (llmkit prints one line of its own per tracker); their warnings stay."""
    os.environ.setdefault("WANDB_SILENT", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys with scalar values (lists as text), as every tracker accepts."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = (
                value if value is None or isinstance(value, bool | int | float | str) else str(value)
            )
    return flat


def _build(name: str, run_dir: Path, project: str, run_id: str | None) -> Any:
    from accelerate.tracking import MLflowTracker, TrackioTracker, WandBTracker

    if name == "wandb":
        return WandBTracker(
            os.environ.get("WANDB_PROJECT", project),
            dir=str(run_dir),
            name=run_dir.name,
            id=run_id or uuid.uuid4().hex[:12],
            resume="allow",
        )
    if name == "mlflow":
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        return MLflowTracker(project, logging_dir=None, run_id=run_id, run_name=run_dir.name)
    return TrackioTracker(project, name=run_dir.name, resume="allow" if run_id else "never")


def _where(name: str, tracker: Any) -> str:
    if name == "wandb":
        run = tracker.run
        if run.settings.mode in ("offline", "dryrun"):
            folder = Path(run.dir).parent
            return f"offline run in {folder} (upload with `wandb sync {folder}`)"
        return f"run {run.url}"
    if name == "mlflow":
        import mlflow

        return f"run {tracker.active_run.info.run_id} at {mlflow.get_tracking_uri()}"
    from trackio.utils import TRACKIO_DIR

    return f"run {tracker.run.name} of project {tracker.run_name} in {TRACKIO_DIR} (`trackio show`)"


def _run_id(name: str, tracker: Any) -> str:
    if name == "wandb":
        return str(tracker.run.id)
    if name == "mlflow":
        return str(tracker.active_run.info.run_id)
    return str(tracker.run.name)
