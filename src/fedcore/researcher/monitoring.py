"""Watching an experiment: per-round metrics, training curves and TensorBoard event files.

Everything here reads an experiment's :attr:`~fedcore.Experiment.history` (one row per
node and round). :func:`round_metrics` is what :meth:`Experiment.metrics` returns,
:func:`plot` draws training curves with matplotlib, and :class:`TensorBoardWriter` appends
each completed round to TensorBoard event files. matplotlib and tensorboard are optional
(the ``plot`` and ``tensorboard`` extras) and imported on
first use; TensorBoard files are written without TensorFlow.
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
import math
import os
import re
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from fedcore.errors import ConfigurationError, MissingDependencyError, install_hint

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["WHICH", "TensorBoardWriter", "metric_columns", "plot", "round_metrics"]

log = logging.getLogger("fedcore.monitoring")

#: The metric families of the history: the model each round started from (``global_*``),
#: the nodes' updates (``local_*``) and what local training reported (``train_*``).
WHICH = ("global", "local", "train")
# Evaluations are weighted by the test samples they ran on, training by its samples.
_WEIGHT = {"global": "n_test", "local": "n_test", "train": "n_samples"}
_TITLES = {"global": "global model (as each round starts)", "local": "nodes' updates",
           "train": "local training"}
_AGGREGATE_LABEL = "all nodes (weighted)"


def _check_which(which: str) -> None:
    if which not in WHICH:
        raise ConfigurationError(
            f"Expected which to be one of {', '.join(map(repr, WHICH))}. Received: {which!r}")


def _is_timing(column: str) -> bool:
    return column.endswith("_s")  # train_s, total_s, round_s...: seconds, not metrics


def metric_columns(history: pd.DataFrame, which: str = "global") -> dict[str, str]:
    """The numeric metrics of family ``which`` in ``history``: ``{metric: column}``.

    ``metric_columns(exp.history, "global")`` gives e.g. ``{"accuracy": "global_accuracy",
    "f1": "global_f1", ...}``. Timings (``train_s``) are not metrics.
    """
    _check_which(which)
    prefix = f"{which}_"
    found = {}
    for column in history.columns:
        if (isinstance(column, str) and column.startswith(prefix) and not _is_timing(column)
                and pd.api.types.is_numeric_dtype(history[column])
                and not pd.api.types.is_bool_dtype(history[column])):
            found[column[len(prefix):]] = column
    return found


def _usable(history: pd.DataFrame, which: str) -> pd.DataFrame:
    """Rows that count for ``which``: answered, with samples to weight them by."""
    if "status" not in history or _WEIGHT[which] not in history:
        return history.iloc[0:0]
    weight = history[_WEIGHT[which]]
    return history[(history["status"] == "ok") & (weight.fillna(0) > 0)]


def round_metrics(history: pd.DataFrame, which: str = "global") -> pd.DataFrame:
    """Per-round means of the ``which`` metrics over the nodes: what ``Experiment.metrics`` gives.

    One row per round: ``round``, ``nodes`` (how many nodes count) and one column per
    metric. Evaluations (``global``, ``local``) are weighted by each node's test samples
    (``n_test``), training statistics (``train``) by its training samples (``n_samples``).
    Failed and missing nodes, and nodes without such samples, are left out.
    """
    _check_which(which)
    if history.empty or "round" not in history:
        return pd.DataFrame()
    columns = metric_columns(history, which)
    usable = _usable(history, which)
    groups = dict(list(usable.groupby("round")))
    rows = []
    for rnd in sorted(history["round"].dropna().unique()):
        ok = groups.get(rnd, usable.iloc[0:0])
        row: dict[str, Any] = {"round": rnd, "nodes": len(ok)}
        for metric, column in columns.items():
            valid = ok[ok[column].notna()]
            if len(valid):
                weights = valid[_WEIGHT[which]]
                row[metric] = float((valid[column] * weights).sum() / weights.sum())
        rows.append(row)
    return pd.DataFrame(rows)


# --- plots ----------------------------------------------------------------------------------

@functools.cache
def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError(
            f"Plotting needs matplotlib ({exc}). {install_hint('plot')}.") from exc

    class MonitoringFigure(Figure):
        """A Figure that shows itself in Jupyter as a PNG, without pyplot's inline backend."""

        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png")
            return buffer.getvalue()

    return MonitoringFigure


def _available(history: pd.DataFrame) -> str:
    parts = []
    for which in WHICH:
        names = sorted(metric_columns(history, which))
        parts.append(f"{which}: {', '.join(names) if names else '(none)'}")
    return "; ".join(parts)


def _withheld(history: pd.DataFrame) -> str:
    """Why metrics may be missing: nodes under differential privacy withhold them."""
    column = history.get("privacy_withheld")
    if column is None or not column.notna().any():
        return ""
    return (" Nodes training under differential privacy withheld their metrics and losses "
            "(history column privacy_withheld): no noise covers them. Evaluate the global "
            "model on data of your own, or train without DP where the nodes allow it.")


def plot(
    history: pd.DataFrame,
    metric: str = "accuracy",
    which: str = "global",
    path: str | Path | None = None,
    ax: Axes | None = None,
    *,
    figsize: tuple[float, float] = (7.0, 4.2),
    dpi: float = 100,
) -> Figure:
    """Training curves of one metric: a line per node and the weighted mean over nodes, bold.

    ``metric`` is the name after the family prefix of a history column (``accuracy`` for
    ``global_accuracy``, ``loss`` for ``train_loss``...); ``which`` picks the family:
    ``"global"`` (the model each round started from), ``"local"`` (the nodes' updates) or
    ``"train"`` (what local training reported). The bold line is :func:`round_metrics`.

    Draws into ``ax`` when given, else into a new figure of ``figsize`` inches at ``dpi``;
    saves it to ``path`` when given (the format follows the suffix: ``.png``, ``.svg``,
    ``.pdf``). Returns the matplotlib ``Figure``, which a notebook displays; no window is
    ever opened and pyplot's state is left alone.
    """
    _check_which(which)
    if history.empty or "round" not in history:
        raise ConfigurationError("The history is empty: run at least one round first.")
    columns = metric_columns(history, which)
    if metric not in columns:
        raise ConfigurationError(
            f"Expected a metric of the history. Received: metric={metric!r}, "
            f"which={which!r}. Available metrics: {_available(history)}."
            f"{_withheld(history)}")
    column = columns[metric]
    if ax is None:
        fig = _figure_class()(figsize=figsize, dpi=dpi, layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure.figure  # the root figure, also when ax is in a SubFigure
    usable = _usable(history, which)
    for node, rows in usable[usable[column].notna()].groupby("node", sort=True):
        rows = rows.sort_values("round")
        ax.plot(rows["round"], rows[column], marker="o", markersize=3, linewidth=1.2,
                label=str(node))
    mean = round_metrics(history, which)
    if metric in mean:
        mean = mean[mean[metric].notna()]
        ax.plot(mean["round"], mean[metric], color="black", linewidth=3.0, zorder=3,
                label=_AGGREGATE_LABEL)
    _decorate(ax, metric, which)
    if path is not None:
        _save(fig, Path(path))
    return fig


def _decorate(ax: Axes, metric: str, which: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(f"{metric}: {_TITLES[which]}")
    ax.set_xlabel("round")
    ax.set_ylabel(f"{which}_{metric}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    n_lines = len(ax.get_lines())
    ax.legend(fontsize="small", ncol=1 + n_lines // 12, loc="best")


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path)
    except ValueError as exc:  # an unknown format, named by the suffix
        raise ConfigurationError(
            f"Expected a path ending in .png, .svg or .pdf. Received: {str(path)!r} ({exc})"
        ) from exc


# --- TensorBoard ----------------------------------------------------------------------------

_AGGREGATE_RUN = "aggregate"
_NODES_RUN = "nodes"
_uid = itertools.count()


def _tensorboard() -> tuple[Any, Any, Any, Any]:
    """The pieces of the ``tensorboard`` package used here (never TensorFlow)."""
    try:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError as exc:
        raise MissingDependencyError(
            f"TensorBoard logging needs the tensorboard package ({exc}). "
            f"{install_hint('tensorboard')}.") from exc
    return Event, SessionLog, Summary, RecordWriter


def _run_name(node: str) -> str:
    """A folder name for ``node`` (ids are usually safe; anything else becomes ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", node) or "_"


class TensorBoardWriter:
    """Appends an experiment's completed rounds to TensorBoard event files in ``logdir``.

    One TensorBoard *run* (a sub-folder) holds the means over nodes,
    ``<logdir>/aggregate``, and one per node, ``<logdir>/nodes/<node id>``. Every run uses
    the same tags, so TensorBoard draws the nodes and their mean on one chart per tag:

    - ``global/<metric>``, ``local/<metric>``, ``train/<stat>``: in ``aggregate`` the
      weighted means of :func:`round_metrics`, in a node's run that node's values;
    - ``samples/train`` and ``samples/test``: sample counts (summed in ``aggregate``);
    - ``time/round_s`` and ``nodes/ok``, ``nodes/failed`` (``aggregate``): the round's wall
      time and how many nodes answered or not; ``time/<timing>`` (a node's run): its
      ``round_trip_s``, ``total_s``, ``train_s``...

    The step is the round. Files are appended and flushed after every round, so a running
    ``tensorboard --logdir <logdir>`` shows rounds as they complete. A new writer (a resumed
    experiment) marks its first round with a restart event: TensorBoard then drops any point
    from that round on that an interrupted run had written, so no round appears twice.
    """

    def __init__(self, logdir: str | Path):
        _tensorboard()  # fail now, not after the first round, when the extra is missing
        self.logdir = Path(logdir)
        self._files: dict[str, Path] = {}  # run -> the event file this writer appends to

    def __repr__(self) -> str:
        return f"TensorBoardWriter({str(self.logdir)!r})"

    def write_round(self, rnd: int, rows: pd.DataFrame) -> None:
        """Append round ``rnd`` from its rows of the history (one per node).

        A file-system error is logged, never raised: monitoring does not stop training.
        """
        runs: dict[str, dict[str, float]] = {_AGGREGATE_RUN: self._aggregate(rows)}
        if "node" in rows:
            for _, row in rows.iterrows():
                if row.get("status") == "ok":
                    runs[f"{_NODES_RUN}/{_run_name(str(row['node']))}"] = _node_scalars(row)
        try:
            for run, scalars in runs.items():
                self._append(run, rnd, scalars)
        except OSError as exc:
            log.warning("Round %d was not written to TensorBoard in %s: %s", rnd,
                        self.logdir, exc)

    def _aggregate(self, rows: pd.DataFrame) -> dict[str, float]:
        scalars: dict[str, float] = {}
        for which in WHICH:
            means = round_metrics(rows, which)
            for metric in means.columns.drop(["round", "nodes"], errors="ignore"):
                scalars[f"{which}/{metric}"] = means[metric].iloc[0]
        ok = rows["status"] == "ok" if "status" in rows else pd.Series(True, rows.index)
        scalars["nodes/ok"] = int(ok.sum())
        scalars["nodes/failed"] = int((~ok).sum())
        for tag, column in (("samples/train", "n_samples"), ("samples/test", "n_test")):
            if column in rows:
                scalars[tag] = rows.loc[ok, column].sum()
        if "round_s" in rows and rows["round_s"].notna().any():
            scalars["time/round_s"] = rows["round_s"].max()
        return scalars

    def _append(self, run: str, step: int, scalars: dict[str, float]) -> None:
        Event, SessionLog, Summary, RecordWriter = _tensorboard()
        values = [Summary.Value(tag=tag, simple_value=float(v)) for tag, v in scalars.items()
                  if _finite(v)]
        now = time.time()
        records = []
        path = self._files.get(run)
        if path is None:
            folder = self.logdir / run
            folder.mkdir(parents=True, exist_ok=True)
            # TensorBoard reads a run's files in name order: microseconds keep that the
            # order they were written in, so a resumed run's restart event comes last.
            path = folder / (f"events.out.tfevents.{now:017.6f}.{socket.gethostname()}."
                             f"{os.getpid()}.{next(_uid)}.fedcore")
            records.append(Event(wall_time=now, file_version="brain.Event:2"))
            # "Restarted at this step": readers discard earlier points at steps >= step.
            records.append(Event(wall_time=now, step=step,
                                 session_log=SessionLog(status=SessionLog.START)))
        records.append(Event(wall_time=now, step=step, summary=Summary(value=values)))
        with open(path, "ab") as file:
            writer = RecordWriter(file)
            for record in records:
                writer.write(record.SerializeToString())
        self._files[run] = path


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _node_scalars(row: pd.Series) -> dict[str, float]:
    frame = row.to_frame().T.infer_objects()
    scalars: dict[str, float] = {}
    for which in WHICH:
        for metric, column in metric_columns(frame, which).items():
            scalars[f"{which}/{metric}"] = row[column]
    for tag, column in (("samples/train", "n_samples"), ("samples/test", "n_test")):
        if column in row:
            scalars[tag] = row[column]
    for column in _timings(row.index):
        scalars[f"time/{column}"] = row[column]
    return scalars


def _timings(columns: Iterable[Any]) -> list[str]:
    return [c for c in columns if isinstance(c, str) and _is_timing(c) and c != "round_s"]
