"""``fedcore-node`` governance commands: plan, policy, audit, user, gui; dataset files.

Each ``_<command>`` function carries out one parsed command and returns an exit code.
"""

from __future__ import annotations

import argparse
import difflib
import getpass
import json
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedcore.errors import ConfigurationError, FedcoreError, install_hint
from fedcore.governance import SETTINGS, STATUSES
from fedcore.governance.policies import parse_setting, suspicious_keys
from fedcore.node import Node
from fedcore.node.users import MIN_PASSWORD_LENGTH, ROLES

DESCRIPTION_HELP = """\
description file (TOML), for `dataset add --file FILE`:

  name = "diabetes-2024"                # shown to researchers (required)
  tags = ["diabetes", "2024"]           # what researchers search by (required)
  path = "exports/diabetes.csv"         # the data file or folder (required)
  kind = "csv"                          # csv, npz, medical-folder, image-folder, dicom
                                        # (optional: from the file suffix)
  description = "Adults seen in 2024"   # optional

  [options]                             # optional loader options of the kind,
  read_csv = { sep = ";" }              # e.g. demographics = "participants.csv"

  [loading_plan]                        # optional DataLoadingPlan (docs/biomedical-data.md)

A relative path (path, options.demographics) is taken from the folder of the description
file and may not leave it ("../" is refused); give an absolute path for data elsewhere.
"""

_DESCRIPTION_KEYS: dict[str, type | tuple[type, ...]] = {
    "name": str, "tags": (list, str), "path": str, "kind": str, "description": str,
    "options": dict, "loading_plan": dict}
_REQUIRED = ("name", "tags", "path")
_PATH_OPTIONS = ("demographics",)


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as an aligned text table with a header line."""
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns).rstrip()
              for r in rows]
    return "\n".join(lines)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def _admin() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no user name in this environment
        return "cli"


# --- parsers --------------------------------------------------------------------------------


def add_parsers(sub: Any) -> None:
    """Add the plan, policy, audit, user and gui commands to ``fedcore-node``'s parser."""
    raw = argparse.RawDescriptionHelpFormatter
    plan = sub.add_parser("plan", help="review training plans: list, show, diff, approve, "
                          "reject")
    psub = plan.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = psub.add_parser("list", help="submitted plans and their review status")
    p.add_argument("--status", choices=STATUSES, help="only plans with this status")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = psub.add_parser("show", help="one plan: hash, submitter, review, source")
    p.add_argument("plan", help="the plan's SHA-256 or its first 6+ characters")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = psub.add_parser("diff", help="what changed since the plan's previous version")
    p.add_argument("plan", help="the plan's SHA-256 or its first 6+ characters")
    p.add_argument("--against", metavar="PLAN",
                   help="compare with this plan (default: the previous version of the "
                   "same plan class)")
    p = psub.add_parser("approve", help="let this exact plan (its hash) train here")
    p.add_argument("plan", help="the plan's SHA-256 or its first 6+ characters")
    p.add_argument("--note", default="", help="a note for the record and the researcher")
    p = psub.add_parser("reject", help="refuse the plan; the researcher sees the note")
    p.add_argument("plan", help="the plan's SHA-256 or its first 6+ characters")
    p.add_argument("--note", required=True, help="why (the researcher sees it)")

    policy = sub.add_parser("policy", help="show or change the node's policy")
    polsub = policy.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = polsub.add_parser("show", help="every policy setting, its value and meaning")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    keys = "\n".join(f"  {k:<18} {s.help}" for k, s in SETTINGS.items())
    p = polsub.add_parser(
        "set", help="change settings: KEY=VALUE ...", formatter_class=raw,
        description="Change policy settings in config.toml (checked first; audited). "
        "VALUE is TOML (true, 5, \"refuse\", [\"a\", \"b\"]) or a bare word; none restores "
        "the default. dataset_access.RESEARCHER=ds1,ds2 sets one researcher's datasets "
        "(\"*\" for everyone).\n\nkeys:\n" + keys)
    p.add_argument("settings", nargs="+", metavar="KEY=VALUE")

    audit = sub.add_parser("audit", help="show or verify the audit log")
    asub = audit.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = asub.add_parser("show", help="print audit records")
    p.add_argument("--tail", type=int, default=0, help="only the last N records")
    p.add_argument("--event", help="only records of this event (e.g. decision, trained)")
    p.add_argument("--json", action="store_true", help="JSON lines, as stored")
    p = asub.add_parser("verify", help="check the hash chain and the database against it; "
                        "exit code 1 names each edited, inserted or deleted record and each "
                        "plan, dataset or account the log does not account for, and a "
                        "config.toml unlike the one the last recorded change left")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    asub.add_parser("accept-config", help="record config.toml as it is now, after you "
                    "reviewed a hand edit that `audit verify` reports (writes a "
                    "config-accepted record with the file's SHA-256)")

    user = sub.add_parser("user", help="accounts of the web GUI (no account exists until "
                          "you add one)")
    usub = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = usub.add_parser("add", help="create an account (asks for the password)")
    p.add_argument("username")
    p.add_argument("--role", choices=ROLES, required=True)
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of standard input")
    p = usub.add_parser("passwd", help="change an account's password")
    p.add_argument("username")
    p.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of standard input")
    p = usub.add_parser("list", help="accounts and their roles")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    gui = sub.add_parser("gui", help="serve the administration web GUI (needs the gui extra)")
    gui.add_argument("--host", default="127.0.0.1", help="address to listen on "
                     "(default 127.0.0.1: this machine only)")
    gui.add_argument("--port", type=int, default=8484, help="port (default 8484)")


def handler(command: str) -> Callable[[argparse.Namespace, Node, Any], int] | None:
    """The function carrying out ``command`` (``None`` for the commands of cli.py)."""
    return {"plan": _plan, "policy": _policy, "audit": _audit, "user": _user,
            "gui": _gui}.get(command)


# --- plan -----------------------------------------------------------------------------------


def _plan(args: argparse.Namespace, node: Node, out: Any) -> int:
    plans = node.plans
    if args.action == "list":
        entries = plans.list(status=args.status)
        if args.json:
            print(json.dumps([{k: v for k, v in e.items() if k != "files"} for e in entries],
                             indent=1), file=out)
        elif not entries:
            print("No plans. Researchers submit them with Experiment.submit_plan().",
                  file=out)
        else:
            print(table([{"sha256": e["sha256"][:16], "plan": e["entry"],
                          "backend": e["backend"], "status": e["status"],
                          "submitter": e["submitter"], "submitted": _when(e["submitted_at"]),
                          "reviewed by": e["reviewed_by"]} for e in entries],
                        ["sha256", "plan", "backend", "status", "submitter", "submitted",
                         "reviewed by"]), file=out)
    elif args.action == "show":
        e = plans.get(args.plan)
        if args.json:
            print(json.dumps(e, indent=1), file=out)
            return 0
        previous = plans.previous(e["sha256"])
        lines = [f"sha256:     {e['sha256']}", f"plan:       {e['entry']} ({e['backend']})",
                 f"status:     {e['status']}" + (f" by {e['reviewed_by']} on "
                                                  f"{_when(e['reviewed_at'])}"
                                                  if e["reviewed_at"] else ""),
                 f"note:       {e['note']}",
                 f"submitter:  {e['submitter']} on {_when(e['submitted_at'])}",
                 f"message:    {e['message']}",
                 "previous:   " + (f"{previous['sha256']} ({previous['status']}): see "
                                   f"`fedcore-node plan diff {e['sha256'][:12]}`"
                                   if previous else "none (first version of this plan)")]
        for name, source in sorted(e["files"].items()):
            lines += ["", f"--- {name} ---", source.rstrip("\n")]
        print("\n".join(lines), file=out)
    elif args.action == "diff":
        text = plans.diff(args.plan, args.against)
        if text:
            print(text, end="", file=out)
        elif args.against or plans.previous(args.plan):
            print("The sources are the same.", file=out)
        else:
            print(f"No earlier version of {plans.get(args.plan)['entry']} to compare with: "
                  "this is its first submission. Review it whole with `fedcore-node plan "
                  "show`.", file=out)
    elif args.action == "approve":
        e = plans.approve(args.plan, by=_admin(), note=args.note)
        print(f"Approved {e['sha256']} ({e['entry']}): it may train here from the next "
              "round on.", file=out)
    elif args.action == "reject":
        e = plans.reject(args.plan, by=_admin(), note=args.note)
        print(f"Rejected {e['sha256']} ({e['entry']}); researchers see: {args.note}",
              file=out)
    return 0


# --- policy ---------------------------------------------------------------------------------


def _policy(args: argparse.Namespace, node: Node, out: Any) -> int:
    if args.action == "show":
        policy = node.policy
        if args.json:
            print(json.dumps(policy, indent=1), file=out)
            return 0
        rows = [{"key": k, "value": _show(policy[k]),
                 "default": "" if policy[k] == s.default else f"(default {_show(s.default)})",
                 "meaning": s.help} for k, s in SETTINGS.items()]
        print(table(rows, ["key", "value", "default", "meaning"]), file=out)
        for key in suspicious_keys(node.config):
            print(f"warning: config.toml key {key} is not a policy setting and has no "
                  "effect", file=out)
        return 0
    with node.db.transaction():  # dataset_access.X=... changes the table as it is now
        changed = node.set_policy(by=_admin(), **_policy_changes(args.settings, node))
    if not changed:
        print("Nothing changed.", file=out)
    for key, (old, new) in changed.items():
        print(f"{key}: {_show(old)} -> {_show(new)}", file=out)
    return 0


def _policy_changes(settings: Sequence[str], node: Node) -> dict[str, Any]:
    """The policy changes `policy set KEY=VALUE ...` asks for, checked."""
    changes: dict[str, Any] = {}
    for item in settings:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigurationError(f"Expected KEY=VALUE. Received: {item!r}")
        if key.startswith("dataset_access."):
            who = key.split(".", 1)[1]
            access = dict(changes.get("dataset_access") or node.policy["dataset_access"] or {})
            names = [n.strip() for n in text.split(",") if n.strip()]
            if names:
                access[who] = names
            else:
                access.pop(who, None)
            changes["dataset_access"] = access or None
            continue
        value = parse_setting(key, text)
        if SETTINGS[key].type == "access" and isinstance(value, str):
            raise ConfigurationError(
                f"dataset_access is a table: set one researcher's datasets with "
                f"dataset_access.RESEARCHER=ds1,ds2. Received: {item!r}")
        changes[key] = value
    return changes


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


# --- audit ----------------------------------------------------------------------------------


def _audit(args: argparse.Namespace, node: Node, out: Any) -> int:
    if args.action == "verify":
        report = node.verify_audit()
        if args.json:
            print(json.dumps({"ok": report.ok, "records": report.records, "head": report.head,
                              "problems": [{"line": p.line, "seq": p.seq, "event": p.event,
                                            "message": p.message} for p in report.problems],
                              "mismatches": report.mismatches, "notes": report.notes},
                             indent=1), file=out)
        else:
            print(report, file=out)
        return 0 if report.ok else 1
    if args.action == "accept-config":
        sha = node.accept_config(by=_admin())
        print(f"Recorded config.toml as it is now (SHA-256 {sha[:16]}...).", file=out)
        return 0
    records = node.audit_log()
    if args.event:
        records = [r for r in records if r.get("event") == args.event]
    if args.tail:
        records = records[-args.tail:]
    if args.json:
        for record in records:
            print(json.dumps(record), file=out)
        return 0
    skip = {"seq", "time", "event", "node", "prev"}
    rows = [{"seq": r.get("seq", ""), "time": _when(r.get("time")), "event": r.get("event"),
             "details": " ".join(f"{k}={_show(v)}" for k, v in r.items()
                                 if k not in skip and v not in (None, "", {}, []))}
            for r in records]
    print(table(rows, ["seq", "time", "event", "details"]) if rows else "No audit records.",
          file=out)
    return 0


# --- users ----------------------------------------------------------------------------------


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise ConfigurationError("No terminal to ask the password on: pass "
                                 "--password-stdin and write it to standard input.")
    first = getpass.getpass(f"Password (at least {MIN_PASSWORD_LENGTH} characters): ")
    if getpass.getpass("Again: ") != first:
        raise ConfigurationError("The two passwords differ; nothing was changed.")
    return first


def _user(args: argparse.Namespace, node: Node, out: Any) -> int:
    if args.action == "list":
        users = node.users.list()
        if args.json:
            print(json.dumps(users, indent=1), file=out)
        else:
            print(table([{**u, "created": _when(u["created"])} for u in users],
                        ["username", "role", "created"]) if users else
                  "No users. Add the first administrator with: fedcore-node user add NAME "
                  "--role admin", file=out)
    elif args.action == "add":
        node.users.add(args.username, _password(args), args.role)
        print(f"User {args.username!r} added ({args.role}).", file=out)
    elif args.action == "passwd":
        node.users.set_password(args.username, _password(args))
        print(f"Password of {args.username!r} changed.", file=out)
    return 0


# --- gui ------------------------------------------------------------------------------------


def _gui(args: argparse.Namespace, node: Node, out: Any) -> int:
    try:
        from fedcore_node.gui import serve
    except ImportError as exc:
        raise FedcoreError(
            f"The node GUI is not available in this installation ({exc}). "
            f"{install_hint('gui')}.") from exc
    print(f"Serving the GUI of node {node.node_id} on http://{args.host}:{args.port} "
          "(Ctrl-C stops it)", file=out, flush=True)
    serve(node, args.host, args.port)
    return 0


# --- dataset description files --------------------------------------------------------------


def load_description(file: str) -> dict[str, Any]:
    """Read a dataset description file into the arguments of ``DatasetRegistry.add``."""
    path = Path(file)
    try:
        with open(path, "rb") as f:
            desc = tomllib.load(f)
    except OSError as exc:
        raise ConfigurationError(f"Cannot read the description file {file}: "
                                 f"{exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{file} is not valid TOML: {exc}") from exc
    for key in desc:
        if key not in _DESCRIPTION_KEYS:
            close = difflib.get_close_matches(key, _DESCRIPTION_KEYS, n=1)
            raise ConfigurationError(
                f"{file}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close
                                                  else "") + f". Keys: "
                f"{', '.join(_DESCRIPTION_KEYS)}. See `fedcore-node dataset add --help`.")
    missing = [k for k in _REQUIRED if k not in desc]
    if missing:
        raise ConfigurationError(
            f"{file}: missing key {missing[0]!r}. A description file needs name, tags and "
            "path. See `fedcore-node dataset add --help`.")
    for key, value in desc.items():
        if not isinstance(value, _DESCRIPTION_KEYS[key]):
            raise ConfigurationError(f"{file}: {key} has the wrong type "
                                     f"({type(value).__name__}).")
    tags = desc["tags"]
    if isinstance(tags, str):
        tags = tags.split(",")
    base = path.resolve().parent
    options = dict(desc.get("options", {}))
    for key in _PATH_OPTIONS:
        if isinstance(options.get(key), str):
            options[key] = str(_inside(base, options[key], f"{file}: options.{key}"))
    return {"name": desc["name"], "tags": [str(t) for t in tags],
            "path": _inside(base, desc["path"], f"{file}: path"), "kind": desc.get("kind"),
            "description": desc.get("description", ""), "options": options,
            "loading_plan": desc.get("loading_plan")}


def _inside(base: Path, value: str, what: str) -> Path:
    """``value`` resolved from ``base``; a relative path may not climb out of ``base``."""
    given = Path(value).expanduser()
    if given.is_absolute():
        return given
    resolved = (base / given).resolve()
    if ".." in given.parts or not resolved.is_relative_to(base):
        raise ConfigurationError(
            f"{what} = {value!r} leaves the folder of the description file ({base}). A "
            "relative path must stay inside it; give an absolute path for data elsewhere.")
    return resolved
