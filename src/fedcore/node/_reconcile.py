"""The second half of ``audit verify``: the node's database checked against its audit log.

Every plan, dataset and GUI account in ``db.json`` got there through a change that wrote its
audit record in the same transaction (see :mod:`fedcore.node._storage`), so the log replayed
from the start must give the database's state: the plans submitted and each one's review
status (its last ``plan-approved`` / ``plan-rejected``, else pending), the datasets added and
not removed, the accounts added. Anything else is a change made behind the node's back (a
hand edit, a restored backup) or a lost one, and is reported with what to look at.

``config.toml`` is checked the same way: every change the node makes to it is written with
an audit record that carries the file's new SHA-256 (``config_sha256``), so the file must
have the hash of the last such record. A hand edit shows up until it is reviewed and
recorded with ``fedcore-node audit accept-config`` (:meth:`Node.accept_config`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedcore.node._storage import CONFIG_HASH, NodeDatabase, file_sha256
from fedcore.node.audit import AuditLog, AuditReport, verify

__all__ = ["check_config", "check_database", "verify_home"]

_DECISIONS = {"plan-approved": "approved", "plan-rejected": "rejected"}


def verify_home(db: NodeDatabase, audit: AuditLog, config: Path | None = None
                ) -> AuditReport:
    """Check the audit log's chain, then the database (and ``config``) against it.

    Everything is read under the home's lock. Records a crash left unwritten are appended
    first (a change and its record are one).
    """
    with db.transaction():  # no writer between reading the database and the log
        tables = db.storage.read() or {}
        records = audit.records()
        report = verify(audit.path)
        found = file_sha256(config) if config is not None else None
    mismatches = check_database(tables, records)
    if config is not None and found is not None:
        mismatches += check_config(config.name, found, records)
    return dataclasses.replace(report, mismatches=mismatches)


def check_config(name: str, found: str, records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Whether ``found`` (the SHA-256 of the config file) is what the last change left.

    A home whose log records no hash yet (made before this check existed) is not compared
    until its first audited change.
    """
    last: Mapping[str, Any] | None = None
    for r in records:
        if isinstance(r.get(CONFIG_HASH), str):
            last = r
    if last is None or last[CONFIG_HASH] == found:
        return []
    return [f"{name} is not what the last audited change left (record {last.get('seq')}, "
            f"{last.get('event')}): its SHA-256 is {found[:16]}, the log says "
            f"{str(last[CONFIG_HASH])[:16]}. It was edited by hand or restored from a backup. "
            "Review it (`fedcore-node policy show`, `fedcore-node trust list`, `fedcore-node "
            "peer list`), then record it as it is with `fedcore-node audit accept-config`."]


def check_database(tables: Mapping[str, Any], records: Iterable[Mapping[str, Any]]
                   ) -> list[str]:
    """What in ``tables`` (the parsed ``db.json``) the audit ``records`` do not account for."""
    submitted: dict[str, int] = {}
    decided: dict[str, tuple[str, int]] = {}
    datasets: dict[str, int] = {}
    removed: dict[str, int] = {}
    users: dict[str, int] = {}
    for r in records:
        event, seq = r.get("event"), int(r.get("seq") or 0)
        if event == "plan-submitted":
            submitted.setdefault(str(r.get("plan")), seq)
        elif event in _DECISIONS:
            decided[str(r.get("plan"))] = (_DECISIONS[str(event)], seq)
        elif event == "dataset-added":
            datasets[str(r.get("dataset"))] = seq
            removed.pop(str(r.get("dataset")), None)
        elif event == "dataset-removed" and str(r.get("dataset")) in datasets:
            removed[str(r.get("dataset"))] = seq
            del datasets[str(r.get("dataset"))]
        elif event == "user-added":
            users.setdefault(str(r.get("user")), seq)
    return (_plans(_docs(tables, "plans"), submitted, decided)
            + _datasets(_docs(tables, "datasets"), datasets, removed)
            + _users(_docs(tables, "users"), users))


def _docs(tables: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    table = tables.get(name)
    return [d for d in table.values() if isinstance(d, dict)] if isinstance(table, dict) else []


def _plans(entries: list[dict[str, Any]], submitted: dict[str, int],
           decided: dict[str, tuple[str, int]]) -> list[str]:
    out = []
    stored = set()
    for e in entries:
        sha = str(e.get("sha256"))
        stored.add(sha)
        what = f"plan {sha[:16]} ({e.get('entry')})"
        if sha not in submitted:
            out.append(f"{what} is in db.json, but no plan-submitted record names it: it "
                       "was added behind the node's back. Check it with `fedcore-node plan "
                       "show` before it runs.")
            continue
        status, seq = decided.get(sha, ("pending", 0))
        if e.get("status") != status:
            last = f"record {seq} says {status}" if seq else "no decision was recorded"
            out.append(f"{what} is {e.get('status')} in db.json, but {last}. Decide it "
                       "again with `fedcore-node plan approve/reject`.")
    out += [f"plan {sha[:16]} was submitted (record {seq}), but db.json lacks it: the "
            "submission was lost or removed by hand. The researcher can submit it again."
            for sha, seq in submitted.items() if sha not in stored]
    return out


def _datasets(entries: list[dict[str, Any]], added: dict[str, int],
              removed: dict[str, int]) -> list[str]:
    out = []
    stored = set()
    for e in entries:
        ds = str(e.get("id"))
        stored.add(ds)
        if ds not in added:
            how = (f"it was removed (record {removed[ds]})" if ds in removed
                   else "no dataset-added record names it")
            out.append(f"dataset {ds} ({e.get('name')}) is in db.json, but {how}: it was "
                       "added behind the node's back. Check it with `fedcore-node dataset "
                       "show`.")
    out += [f"dataset {ds} was added (record {seq}), but db.json lacks it and no "
            "dataset-removed record says so: register it again if it should be offered."
            for ds, seq in added.items() if ds not in stored]
    return out


def _users(entries: list[dict[str, Any]], added: dict[str, int]) -> list[str]:
    names = {str(e.get("username")) for e in entries}
    out = [f"GUI account {name!r} is in db.json, but no user-added record names it: it was "
           "added behind the node's back. Check `fedcore-node user list`."
           for name in sorted(names - set(added))]
    out += [f"GUI account {name!r} was added (record {seq}), but db.json lacks it."
            for name, seq in added.items() if name not in names]
    return out
