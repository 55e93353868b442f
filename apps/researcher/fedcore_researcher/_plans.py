"""``fedcore plan submit|status|diff``: a plan's review on the nodes, from a shell.

``submit`` sends the plan an experiment file names to the nodes holding its datasets, for
their administrators to review; ``status`` asks where it stands (and can wait for the
approvals); ``diff`` shows what changed between two plans, offline.
"""

from __future__ import annotations

import argparse
import difflib
import time
from pathlib import Path
from typing import Any

import pandas as pd

from fedcore.errors import ConfigurationError
from fedcore.plan.bundle import PlanBundle
from fedcore.researcher import checkpoint
from fedcore_researcher import _output
from fedcore_researcher._experiment_file import load_plan, open_experiment, read_toml

EXIT_OK, EXIT_NOT_YET = 0, 1

PLAN_EPILOG = """\
A node whose policy requires approval runs a plan only once its administrator approved that
exact plan (its SHA-256). Submit it, let the administrators review it (`fedcore-node plan
show|diff|approve` on each node), and check where it stands:

examples:
  fedcore plan submit exp.toml --message "SGD on the 2024 cohort"
  fedcore plan status exp.toml                 # exit code 0 once every node runs it
  fedcore plan status exp.toml --wait 600      # wait up to 10 minutes for the approvals
  fedcore plan diff ckpt exp.toml              # what changed since the checkpoint's plan

exit codes: submit 0 when every node took the plan for review, 1 when a node refused it or
did not answer; status 0 when every node runs it (approved, or approval off), 1 otherwise;
2 bad usage or input.
"""


def add_parser(sub: Any, formatter: type[argparse.HelpFormatter],
               credentials: Any) -> None:
    """Add ``plan`` and its actions to ``fedcore``'s parser."""
    plan = sub.add_parser("plan", help="submit a plan for review, see its approval status, "
                          "diff two plans", formatter_class=formatter, epilog=PLAN_EPILOG,
                          description="The review of an experiment's training plan on the "
                          "nodes: submit it, ask for its status, compare two plans.")
    psub = plan.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, what in (("submit", "send the plan to the nodes for their review"),
                         ("status", "where the plan stands on each node")):
        p = psub.add_parser(action, help=what, formatter_class=formatter, epilog=PLAN_EPILOG,
                            description=what[0].upper() + what[1:] + ": the nodes holding "
                            "the experiment's datasets (its tags, and its nodes if set).")
        p.add_argument("file", metavar="EXPERIMENT_FILE",
                       help="the .toml or .py experiment file whose plan this is")
        p.add_argument("--federation", metavar="URL", help="the federation URL (overrides "
                       "the file)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        credentials(p)
        if action == "submit":
            p.add_argument("--message", default="", help="a note for the reviewers")
        else:
            p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                           help="ask again every second, up to SECONDS, until every node "
                           "runs the plan or one rejected it (default: ask once)")
    p = psub.add_parser("diff", help="what changed between two plans (offline)",
                        formatter_class=formatter, epilog=PLAN_EPILOG,
                        description="A unified diff of the files of two plans, and their "
                        "hashes. Each side is an experiment file (.toml, .py) or a "
                        "checkpoint (file or folder); nothing connects. A checkpoint's "
                        "plan is read, never run.")
    p.add_argument("old", metavar="OLD", help="experiment file or checkpoint")
    p.add_argument("new", metavar="NEW", help="experiment file or checkpoint")


def run(args: argparse.Namespace, out: Any) -> int:
    """Carry out ``fedcore plan ACTION``."""
    if args.action == "diff":
        return _diff(args, out)
    with open_experiment(args.file, federation=args.federation) as exp:
        exp.progress = False
        if args.identity is not None:
            exp.identity = args.identity
        if args.enrolled is not None:
            exp.enrolled = args.enrolled
        if args.action == "submit":
            rows = exp.submit_plan(args.message)
            code = EXIT_OK if rows["status"].isin(["pending", "approved"]).all() and len(
                rows) else EXIT_NOT_YET
        else:
            deadline = time.monotonic() + args.wait
            while True:
                rows = exp.plan_status()
                if _runs(rows) or (rows["status"] == "rejected").any() or (
                        time.monotonic() >= deadline):
                    break
                time.sleep(1.0)
            code = EXIT_OK if _runs(rows) else EXIT_NOT_YET
        plan_name, plan_hash = exp.plan.__name__, exp.plan_hash
    rows = rows.assign(runs=[_runs_here(r) for r in rows.to_dict("records")])
    if args.json:
        print(_output.dumps({"plan": plan_name, "plan_hash": plan_hash,
                             "nodes": _output.records(rows)}), file=out)
        return code
    shown = rows.assign(runs=rows["runs"].map({True: "yes", False: "no"}))
    print(f"Plan {plan_name} ({plan_hash[:12]}):", file=out)
    print(_output.frame_table(shown[["node", "status", "runs", "note"]]), file=out)
    if (rows["status"] == "pending").any():
        print(f"\nEach administrator reviews it with: fedcore-node plan show {plan_hash[:12]}"
              f"\nand approves it with: fedcore-node plan approve {plan_hash[:12]}", file=out)
    if (rows["status"] == "unknown").any():
        print(f"\nNot submitted to every node yet: fedcore plan submit {args.file}", file=out)
    return code


def _runs_here(row: dict[str, Any]) -> bool:
    return row["status"] == "approved" or (row["status"] in ("pending", "unknown") and
                                           row["approval_required"] is False)


def _runs(rows: pd.DataFrame) -> bool:
    return bool(len(rows)) and all(_runs_here(r) for r in rows.to_dict("records"))


# --- diff -----------------------------------------------------------------------------------


def _bundle(spec: str) -> tuple[PlanBundle, str]:
    """The plan of an experiment file or a checkpoint, and a label for it."""
    path = Path(spec)
    if path.is_dir() or path.suffix == ".fedcore":
        return PlanBundle.from_wire(checkpoint.read(path).state["plan"]), f"{spec} (checkpoint)"
    if path.suffix == ".toml":
        if not path.is_file():
            raise ConfigurationError(f"No experiment file at {path}.")
        desc = read_toml(path)
        return PlanBundle.from_class(load_plan(desc["plan"], path.resolve().parent,
                                               str(path))), spec
    if path.suffix == ".py":
        with open_experiment(spec) as exp:
            return PlanBundle.from_class(exp.plan), spec
    raise ConfigurationError(f"Expected an experiment file (.toml, .py) or a checkpoint "
                             f"(a .fedcore file or its folder). Received: {spec}")


def _diff(args: argparse.Namespace, out: Any) -> int:
    old, old_label = _bundle(args.old)
    new, new_label = _bundle(args.new)
    print(f"old: {old.entry} {old.sha256[:12]}  {old_label}\n"
          f"new: {new.entry} {new.sha256[:12]}  {new_label}", file=out)
    if old.sha256 == new.sha256:
        print("Same plan (same SHA-256): the nodes' approval holds.", file=out)
        return EXIT_OK
    lines: list[str] = []
    for name in sorted(set(old.files) | set(new.files)):
        lines += difflib.unified_diff(
            old.files.get(name, "").splitlines(keepends=True),
            new.files.get(name, "").splitlines(keepends=True),
            f"old/{name}" if name in old.files else "/dev/null",
            f"new/{name}" if name in new.files else "/dev/null")
    if old.backend != new.backend:
        lines.append(f"backend: {old.backend} -> {new.backend}\n")
    if old.entry != new.entry:
        lines.append(f"entry class: {old.entry} -> {new.entry}\n")
    print("".join(lines).rstrip("\n"), file=out)
    print("\nA new SHA-256: nodes that require approval must approve it again.", file=out)
    return EXIT_OK
