"""``fedcore-node``: set up, administer and run (``start``, ``status``) a node home.

Exit codes: 0 success, 1 a fedcore error (the message says what to fix; nothing was
changed) or a broken audit chain, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedcore.errors import FedcoreError
from fedcore.node import Node
from fedcore.transport import redact_url
from fedcore_node import _budget, _daemon, _init, _peers, _trust
from fedcore_node._commands import (
    DESCRIPTION_HELP,
    _admin,
    add_parsers,
    handler,
    load_description,
    table,
)
from fedcore_node._launch import DEFAULT_HOME, command


def _parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser of ``fedcore-node``; for a command line naming a command, of that command.

    Building every command's arguments cost as much CPU as the rest of ``fedcore-node
    start`` up to its connection (argparse looks up translations and makes a formatter for
    each argument), so the parser of ``fedcore-node start ...`` holds ``start`` and
    ``status`` only. Top-level help and a command line naming no known command get the
    whole parser.
    """
    p = argparse.ArgumentParser(
        prog="fedcore-node",
        description="Administer a fedcore node: its home folder and the datasets it offers "
        "to researchers. Paths never leave the node; researchers see names, tags and "
        "metadata only.",
    )
    p.add_argument("--home", default=os.environ.get("FEDCORE_NODE_HOME", DEFAULT_HOME),
                   help="node home folder (default: $FEDCORE_NODE_HOME or ./fedcore-node)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    named = command(argv)
    for add in [_GROUPS[named]] if named in _GROUPS else dict.fromkeys(_GROUPS.values()):
        add(sub)
    return p


def _add_dataset_parsers(sub: Any) -> None:
    """Add ``info`` and ``dataset`` to ``fedcore-node``'s parser."""
    sub.add_parser("info", help="show the node's id, name and home")

    ds = sub.add_parser("dataset", help="register, list, map and remove datasets")
    dsub = ds.add_subparsers(dest="action", required=True, metavar="ACTION")

    add = dsub.add_parser("add", help="register a dataset (checked before anything is saved)",
                          epilog=DESCRIPTION_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    add.set_defaults(add_parser=add)
    add.add_argument("--file", help="a description file (TOML, see below) instead of the "
                     "options that follow")
    add.add_argument("--name", help="dataset name shown to researchers")
    add.add_argument("--tags",
                     help="comma-separated tags researchers search by, e.g. diabetes,2024")
    add.add_argument("--path", help="the data file or folder")
    add.add_argument("--kind", help="csv, npz, medical-folder, image-folder, dicom (default: "
                     "from the file suffix)")
    add.add_argument("--description", default="")
    add.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                     help="loader option, repeatable (e.g. demographics=FILE, "
                     "subject_column=participant_id); VALUE is parsed as JSON when it can be")

    lst = dsub.add_parser("list", help="list registered datasets")
    lst.add_argument("--json", action="store_true", help="machine-readable output")

    rm = dsub.add_parser("remove", help="forget a dataset")
    rm.add_argument("dataset_id")

    mp = dsub.add_parser("map", help="attach a DataLoadingPlan (a JSON file) to a dataset")
    mp.add_argument("dataset_id")
    mp.add_argument("plan_file", help="JSON file with the mapping; see docs/biomedical-data.md")

    show = dsub.add_parser("show", help="one dataset's entry, as researchers see it and "
                           "with its local details")
    show.add_argument("dataset_id")
    show.add_argument("--json", action="store_true", help="machine-readable output")


#: The function adding each command's parser (with the others of its group), in the order
#: of ``fedcore-node --help``.
_GROUPS: dict[str, Callable[[Any], None]] = {
    "init": _init.add_parser, "info": _add_dataset_parsers, "dataset": _add_dataset_parsers,
    **dict.fromkeys(("plan", "policy", "audit", "user", "gui"), add_parsers),
    **dict.fromkeys(("start", "status"), _daemon.add_parsers),
    **dict.fromkeys(("identity", "trust"), _trust.add_parsers),
    **dict.fromkeys(("peer", "secagg"), _peers.add_parsers),
    "budget": _budget.add_parsers,
}


def _parse_options(items: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"fedcore-node: error: --option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _open(home: str, *, create: bool = False) -> Node:
    path = Path(home).expanduser()  # also when no shell expanded ~ (systemd, compose)
    if not create and not (path / "config.toml").exists():
        raise FedcoreError(
            f"No node home at {path.resolve()}. Create one with: fedcore-node --home {home} "
            "init --name NAME"
        )
    return Node(path)


def _dataset_args(args: argparse.Namespace) -> dict[str, Any]:
    """What to register: from ``--file``, or from ``--name``, ``--tags``, ``--path``..."""
    given = [f"--{k}" for k in ("name", "tags", "path", "kind") if getattr(args, k)]
    given += ["--description"] * bool(args.description) + ["--option"] * bool(args.option)
    if args.file:
        if given:
            args.add_parser.error(f"--file replaces {', '.join(given)}: give one or the other")
        return load_description(args.file)
    missing = [f"--{k}" for k in ("name", "tags", "path") if not getattr(args, k)]
    if missing:
        args.add_parser.error(f"the following arguments are required: {', '.join(missing)} "
                              "(or --file)")
    return {"name": args.name, "tags": [t for t in args.tags.split(",") if t.strip()],
            "path": args.path, "kind": args.kind, "description": args.description,
            "options": _parse_options(args.option)}


def run(args: argparse.Namespace, out: Any) -> int:
    """Carry out one parsed command, writing to ``out``; returns the exit code."""
    if args.command == "init":
        return _init.init(args, out)
    to_check = _dataset_args(args) if getattr(args, "action", "") == "add" and (
        args.command == "dataset") else None
    node = _open(args.home)
    command = (handler(args.command) or _trust.handler(args.command)
               or _peers.handler(args.command) or _budget.handler(args.command)
               or {"start": _daemon.start, "status": _daemon.status}.get(args.command))
    if command is not None:
        return command(args, node, out)
    if args.command == "info":
        try:
            approval = "required" if node.policy["approval_required"] else "off"
        except FedcoreError as exc:
            approval = f"unknown: the policy is invalid ({exc})"
        pending = len(node.plans.list(status="pending"))
        print(f"id:    {node.node_id}\nname:  {node.config.get('name', '')}\n"
              f"home:  {node.home.resolve()}\nplans: approval {approval}, {pending} pending "
              "review", file=out)
    elif args.action == "add":
        assert to_check is not None
        entry = node.datasets.add(**to_check, by=_admin())  # audited with the change
        print(f"Registered {entry['name']!r} as {entry['id']} "
              f"({entry['metadata'].get('n_samples', '?')} samples, tags {entry['tags']})",
              file=out)
        for line in _report_lines(entry.get("report") or {}):
            print(line, file=out)
    elif args.action == "list":
        rows = node.datasets.list()
        if args.json:
            print(json.dumps([{**node.datasets.public(r, min_count=node.min_count),
                               "kind": r["kind"]} for r in rows],
                             indent=1), file=out)
            return 0
        rows_ = [{"id": r["id"], "name": r["name"], "kind": r["kind"],
                  "tags": ",".join(r["tags"]), "samples": r["metadata"].get("n_samples", ""),
                  "available": "yes" if r["available"] else "NO (file missing)"}
                 for r in rows]
        print(table(rows_, ["id", "name", "kind", "tags", "samples", "available"])
              if rows_ else "No datasets. Add one with: fedcore-node dataset add ...", file=out)
    elif args.action == "remove":
        node.datasets.remove(args.dataset_id, by=_admin())
        print(f"Removed {args.dataset_id}", file=out)
    elif args.action == "show":
        entry = node.datasets.get(args.dataset_id)
        if args.json:
            print(json.dumps(entry, indent=1, default=str), file=out)
        else:
            width = max(map(len, entry))
            print("\n".join(f"{k + ':':<{width + 1}} " + (
                json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
                for k, v in entry.items()), file=out)
    elif args.action == "map":
        try:
            plan = json.loads(Path(args.plan_file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FedcoreError(f"Cannot read the DataLoadingPlan {args.plan_file}: {exc}") from exc
        node.datasets.set_loading_plan(args.dataset_id, plan, by=_admin())
        print(f"DataLoadingPlan attached to {args.dataset_id}", file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fedcore-node``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = _parser(argv).parse_args(argv)
        return run(args, sys.stdout)
    except FedcoreError as exc:
        print(f"fedcore-node: error: {redact_url(str(exc))}", file=sys.stderr)
        return 1


def _report_lines(report: dict[str, Any]) -> list[str]:
    """A registration's report for the administrator: what was left out or is missing."""
    lines = []
    skipped = report.get("skipped_subjects") or {}
    if skipped:
        shown = ", ".join(f"{s} ({why})" for s, why in list(skipped.items())[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        lines.append(f"Skipped {len(skipped)} subject(s): {shown}{more}")
    for modality, n in (report.get("missing_volumes") or {}).items():
        lines.append(f"Missing volumes: {modality} in {n} subject folder(s)")
    missing = report.get("missing_values") or {}
    if missing:
        lines.append("Missing values (NaN or empty): " + ", ".join(
            f"{column} {n}" for column, n in missing.items()))
    return lines

