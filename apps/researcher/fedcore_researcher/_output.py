"""What ``fedcore`` prints: aligned tables for people, JSON and CSV for programs."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedcore import Experiment
from fedcore.transport import redact_url

# History columns shown in the table of `fedcore history` (all of them go to CSV and JSON).
HISTORY_COLUMNS = ("round", "node", "dataset", "status", "n_samples", "n_test")


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as an aligned text table with a header line."""
    cells = [{c: _cell(r.get(c)) for c in columns} for r in rows]
    widths = {c: max([len(c)] + [len(r[c]) for r in cells]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in cells]
    return "\n".join(lines)


def frame_table(frame: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """A DataFrame as :func:`table` (its own columns by default)."""
    columns = list(frame.columns if columns is None else columns)
    return table(frame.to_dict("records"), columns)


def _cell(value: Any) -> str:
    if value is None or value is pd.NaT:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    if isinstance(value, pd.Timestamp):  # in the local time zone
        return value.to_pydatetime().astimezone().strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-ready rows: NaN as null, timestamps in ISO 8601."""
    if frame.empty:
        return []
    return json.loads(frame.to_json(orient="records", date_format="iso"))  # type: ignore[no-any-return]


def dumps(document: Any) -> str:
    """One indented JSON document."""
    return json.dumps(document, indent=1, default=str)


def newest_checkpoint(folder: str | Path | None) -> Path | None:
    """The file ``Experiment.load(folder)`` would read (``None`` without one)."""
    if folder is None or not Path(folder).is_dir():
        return None
    files = sorted(Path(folder).glob("*.fedcore"))
    return files[-1].resolve() if files else None


def summary(exp: Experiment, status: str, checkpoint: Path | None,
            error: str | None = None, failures: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    """The JSON document of ``fedcore run`` and ``fedcore resume``."""
    doc: dict[str, Any] = {
        "status": status, "name": exp.name, "id": exp.id, "federation": exp.federation,
        "plan": exp.plan.__name__, "plan_hash": exp.plan_hash,
        "aggregator": exp.aggregator.name, "round": exp.round, "round_limit": exp.round_limit,
        "metrics": records(exp.metrics()), "local_metrics": records(exp.metrics("local")),
        "checkpoint": None if checkpoint is None else str(checkpoint),
    }
    if error is not None:
        doc.update(error=redact_url(error),
                   failures={k: redact_url(str(v)) for k, v in (failures or {}).items()})
    return doc


def report(exp: Experiment, checkpoint: Path | None) -> str:
    """The text that ends ``fedcore run`` and ``fedcore resume``: metrics per round."""
    head = (f"Experiment {exp.name!r} ({exp.id[:8]}): round {exp.round} of "
            f"{exp.round_limit if exp.round_limit is not None else '?'}, plan "
            f"{exp.plan.__name__} ({exp.plan_hash[:12]}), aggregator {exp.aggregator.name}, "
            f"{exp.federation}")
    metrics = exp.metrics()
    lines = [head, ""]
    if metrics.empty:
        lines.append("No round has run.")
    else:
        lines += ["Global model, as evaluated by the nodes at the start of each round "
                  "(weighted by their test samples):", frame_table(metrics)]
        local = exp.metrics("local")
        last = local.iloc[-1].to_dict() if not local.empty else {}
        shown = {k: v for k, v in last.items() if k not in ("round", "nodes")
                 and isinstance(v, float) and not math.isnan(v)}
        if shown:
            lines.append(f"After round {int(last['round'])}, the nodes' updates: " + ", ".join(
                f"{k} {v:.4f}" for k, v in shown.items()))
    lines.append("")
    if checkpoint is None:
        lines.append("No checkpoint written (pass --checkpoint-dir DIR to write one per "
                     "round).")
    else:
        lines.append(f"Checkpoint: {checkpoint}")
        if exp.round_limit is None or exp.round < exp.round_limit:
            lines.append(f"Continue with: fedcore resume {checkpoint.parent}")
    return "\n".join(lines)


def history_frame(exp: Experiment, *, everything: bool) -> pd.DataFrame:
    """The checkpoint's history: every column, or the readable ones.

    The readable ones: round, node, dataset, status, sample counts, the global model's
    metrics and the errors, without empty columns.
    """
    frame = exp.history
    if everything or frame.empty:
        return frame
    metrics = [c for c in frame.columns if c.startswith("global_")]
    extra = [c for c in ("error",) if c in frame.columns]
    wanted = [c for c in (*HISTORY_COLUMNS, *metrics, *extra) if c in frame.columns]
    return frame[wanted].dropna(axis="columns", how="all")
