"""``fedcore``: run, resume and inspect federated experiments from a shell.

Exit codes: 0 success; 1 a failed run (a round without its quorum, a plan that failed on
the nodes, no node connected...); 2 bad usage or bad input (an unknown key or aggregator,
a missing file, an unreadable or incompatible checkpoint); 130 interrupted (Ctrl-C), after
closing the experiment.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

import fedcore
from fedcore.errors import ConfigurationError, FedcoreError
from fedcore.transport import redact_url
from fedcore_researcher import _commands, _plans
from fedcore_researcher._commands import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Wraps descriptions to the terminal; keeps the epilogs' examples as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return super()._fill_text(text, width, indent)
        return textwrap.fill(text, min(width, 90), initial_indent=indent,
                             subsequent_indent=indent)


_RAW = _Formatter

EPILOG = """\
examples:
  fedcore run exp.toml                         # train; a table of metrics at the end
  fedcore run exp.toml --rounds 10 --checkpoint-dir ckpt --json > result.json
  fedcore resume ckpt                          # continue from the newest checkpoint
  fedcore plan submit exp.toml                 # send the plan to the nodes for review
  fedcore plan status exp.toml --wait 600      # until every node approved it
  fedcore history ckpt --csv > history.csv     # one row per node and round
  fedcore nodes --federation ws://0.0.0.0:8765 --tags diabetes
  fedcore identity                             # your public key, for the nodes to trust
  fedcore enroll site-a KEY                    # accept a node (KEY: `fedcore-node identity`)

exit codes: 0 ok, 1 the run failed (the message names each node's reason), 2 bad usage or
input, 130 interrupted (Ctrl-C). See docs/researcher-cli.md.
"""

TOML_EXAMPLE = """\
plan = "plans.py:Plan"              # required: "file.py:Class" or "package.module:Class"
tags = ["diabetes"]                 # required: the datasets to train on
federation = "ws://0.0.0.0:8765"    # or --federation URL
rounds = 10                         # the total number of rounds, or --rounds N
name = "diabetes-sgd"               # the progress bar's label, kept in the checkpoints
nodes = ["site-a", "site-b"]        # wait for these nodes and train on them only
seed = 0                            # model initialisation and data splits
test_ratio = 0.2                    # share of each node's data held out for evaluation
timeout = 600                       # seconds a round waits for the nodes
connect_timeout = 10                # seconds to wait for the nodes to connect
evaluate_global = true              # evaluate the global model on each node
evaluate_local = true               # evaluate the nodes' updates
checkpoint_dir = "checkpoints"      # one checkpoint per round (or --checkpoint-dir)
identity = "~/.fedcore/researcher.key"   # default $FEDCORE_IDENTITY, then this
enrolled = "~/.fedcore/nodes.toml"       # default $FEDCORE_NODES, then this
secagg = "masking"                  # secure aggregation: "masking", "joye-libert", or a
                                    # [secagg] table with name and its parameters

[aggregator]                        # or one line: aggregator = "fedavg" (the default)
name = "fedprox"                    # a registered aggregator name
mu = 0.01                           # its constructor arguments

[strategy]                          # or one line: strategy = "AllNodes" (the default)
name = "Fraction"                   # "AllNodes" (the default) or "Fraction"
fraction = 0.5
seed = 1
min_nodes = 2                       # the quorum: fewer updates and the round fails

[privacy]                           # differential privacy asked of every node
mechanism = "update"                # "update" (any backend) or "dp-sgd" (torch, Keras)
clip = 1.0
noise_multiplier = 1.1
delta = 1e-5

[model_args]                        # the plan's model arguments
target = "label"

[training_args]                     # local training
epochs = 2
batch_size = 16
"""

RUN_EPILOG = """\
EXPERIMENT_FILE is a TOML description or a Python file.

TOML (relative paths are taken from the TOML file's folder):

{toml}
Python: a file defining a module-level `experiment` (a fedcore.Experiment) or a function
`make_experiment()` that returns one, or yields one and cleans up after the run (a
simulated federation, for example; see docs/researcher-cli.md).

examples:
  fedcore run exp.toml
  fedcore run exp.toml --rounds 20 --federation ws://0.0.0.0:9000 --checkpoint-dir ckpt
  fedcore run exp.toml --json --quiet > result.json
  fedcore run simulation.py                    # a simulated federation, in this process
""".format(toml=textwrap.indent(TOML_EXAMPLE, "  "))

RESUME_EPILOG = """\
CHECKPOINT is a file written by a run with a checkpoint folder (or Experiment.save), or the
folder itself (its newest file). The run goes on up to the experiment's round limit, or
for N more rounds with --rounds N, writing its checkpoints into the same folder. The
researcher's key file and the enrolled nodes' file are those the run used (recorded, as
paths, in the folder's run.toml), unless --identity or --enrolled say otherwise.

examples:
  fedcore resume ckpt
  fedcore resume ckpt/round_0004.fedcore --rounds 5 --json
  fedcore resume ckpt --federation ws://0.0.0.0:9000
"""

NODES_EPILOG = """\
Listens on the federation URL (as `fedcore run` does) and lists the nodes that connect:
with no --nodes, it waits up to --wait seconds for every enrolled node.

examples:
  fedcore nodes --federation ws://0.0.0.0:8765
  fedcore nodes --federation ws://0.0.0.0:8765 --tags diabetes 2024 --json
  fedcore nodes --federation mqtt://broker:1883/study --nodes site-a site-b --wait 30
"""

HISTORY_EPILOG = """\
examples:
  fedcore history ckpt                         # the newest checkpoint of the folder
  fedcore history ckpt/round_0003.fedcore --csv > history.csv
  fedcore history ckpt --metrics               # per-round metrics over the nodes
  fedcore history ckpt --metrics --which local --json
"""


IDENTITY_EPILOG = """\
Enrollment goes both ways. Give the public key this prints to each node's administrator,
who trusts it with `fedcore-node trust add NAME KEY`; the node then answers this researcher.
In turn, enroll each node with the key `fedcore-node identity` prints on it (fedcore enroll).

examples:
  fedcore identity
  fedcore identity --identity ~/keys/study.key --json
"""

ENROLL_EPILOG = """\
KEY is the node's public key, printed on the node by `fedcore-node identity` (with the exact
command to run here). A networked experiment accepts the nodes enrolled in NODES_TOML only;
enrolling a node again replaces its key.

examples:
  fedcore enroll site-a 3q2+7w...=
  fedcore enroll site-a 3q2+7w...= --enrolled study/nodes.toml
"""


def _credentials(p: argparse.ArgumentParser) -> None:
    p.add_argument("--identity", metavar="KEY",
                   help="the researcher's key file (default: $FEDCORE_IDENTITY or "
                   "~/.fedcore/researcher.key)")
    p.add_argument("--enrolled", metavar="NODES_TOML",
                   help="the enrolled nodes' keys (default: $FEDCORE_NODES or "
                   "~/.fedcore/nodes.toml)")


def _output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print one JSON document on stdout instead of the table")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of rounds >= 0, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``fedcore``."""
    p = argparse.ArgumentParser(
        prog="fedcore", formatter_class=_RAW, epilog=EPILOG,
        description="Run and inspect federated experiments: train a plan on the nodes of a "
        "federation, resume from checkpoints, list nodes and datasets, read histories; show "
        "the researcher's key and enroll nodes; submit a plan for review and follow its "
        "approval.")
    p.add_argument("--version", action="version", version=f"fedcore {fedcore.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run an experiment file (TOML or Python)",
                       formatter_class=_RAW, epilog=RUN_EPILOG,
                       description="Build the experiment the file describes and run it up "
                       "to its number of rounds, with a progress bar on stderr; print the "
                       "per-round metrics and where the last checkpoint is.")
    r.add_argument("file", metavar="EXPERIMENT_FILE", help="a .toml or .py experiment file")
    r.add_argument("--rounds", type=_positive, metavar="N",
                   help="the total number of rounds (overrides the file)")
    r.add_argument("--federation", metavar="URL", help="the federation URL (overrides the "
                   "file), e.g. ws://0.0.0.0:8765")
    r.add_argument("--checkpoint-dir", metavar="DIR",
                   help="write a checkpoint there after every round (overrides the file)")
    _output(r)
    _credentials(r)

    s = sub.add_parser("resume", help="continue an experiment from its checkpoint",
                       formatter_class=_RAW, epilog=RESUME_EPILOG,
                       description="Load a checkpoint and run the rounds left; same output "
                       "as `fedcore run`.")
    s.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file or folder")
    s.add_argument("--rounds", type=_positive, metavar="N",
                   help="run N more rounds (default: up to the experiment's round limit)")
    s.add_argument("--federation", metavar="URL",
                   help="the federation URL (default: the one in the checkpoint)")
    s.add_argument("--checkpoint-dir", metavar="DIR",
                   help="write the next checkpoints there (default: the checkpoint's folder)")
    _output(s)
    _credentials(s)

    n = sub.add_parser("nodes", help="list the connected nodes and their datasets",
                       formatter_class=_RAW, epilog=NODES_EPILOG,
                       description="Show which nodes are connected and answer (ping time, "
                       "last seen) and, with --tags, the datasets they hold with those tags.")
    n.add_argument("--federation", metavar="URL", required=True,
                   help="the federation URL, e.g. ws://0.0.0.0:8765")
    n.add_argument("--tags", nargs="+", metavar="T", help="also list the datasets tagged T")
    n.add_argument("--nodes", nargs="+", metavar="ID",
                   help="wait for these nodes (default: every enrolled node)")
    n.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait for the nodes to connect (default 10)")
    n.add_argument("--json", action="store_true", help="machine-readable output")
    _credentials(n)

    h = sub.add_parser("history", help="print a checkpoint's per-node, per-round history",
                       formatter_class=_RAW, epilog=HISTORY_EPILOG,
                       description="Print the history a checkpoint holds: one row per node "
                       "and round (status, samples, metrics, errors), or with --metrics the "
                       "per-round metrics averaged over the nodes.")
    h.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint file or folder")
    fmt = h.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV with every column")
    fmt.add_argument("--json", action="store_true", help="JSON records with every column")
    h.add_argument("--metrics", action="store_true",
                   help="per-round metrics, weighted by the nodes' test samples")
    h.add_argument("--which", choices=("global", "local"), default="global",
                   help="with --metrics: the global model (evaluated at the start of each "
                   "round, default) or the nodes' updates")

    i = sub.add_parser("identity", help="print this researcher's public key (created on "
                       "first use) for the nodes to trust",
                       formatter_class=_RAW, epilog=IDENTITY_EPILOG,
                       description="Show the researcher's key: its public half, fingerprint "
                       "and file. The key is created (mode 600) when there is none yet.")
    i.add_argument("--identity", metavar="KEY",
                   help="the researcher's key file (default: $FEDCORE_IDENTITY or "
                   "~/.fedcore/researcher.key)")
    i.add_argument("--json", action="store_true", help="machine-readable output")

    e = sub.add_parser("enroll", help="accept a node: record its public key in nodes.toml",
                       formatter_class=_RAW, epilog=ENROLL_EPILOG,
                       description="Record a node's public key in the enrolled nodes' file, "
                       "so that experiments accept its replies.")
    e.add_argument("node_id", metavar="NODE_ID", help="the node's id (`fedcore-node "
                   "identity` prints it)")
    e.add_argument("key", metavar="KEY", help="the node's public key (base64 or hex)")
    e.add_argument("--enrolled", metavar="NODES_TOML",
                   help="the enrolled nodes' keys (default: $FEDCORE_NODES or "
                   "~/.fedcore/nodes.toml)")
    _plans.add_parser(sub, _RAW, _credentials)
    return p


_COMMANDS = {"run": _commands.run, "resume": _commands.resume, "nodes": _commands.nodes,
             "history": _commands.history, "identity": _commands.identity,
             "enroll": _commands.enroll, "plan": _plans.run}


class _Lowercase(logging.Formatter):
    # Lower-case levels; and no URL's credentials in any line (a library's error included).
    def format(self, record: logging.LogRecord) -> str:
        return redact_url(super().format(logging.makeLogRecord(
            {**record.__dict__, "levelname": record.levelname.lower()})))


def _logging() -> None:
    """Warnings of the run (a node missing, a policy override) to stderr, once."""
    logger = logging.getLogger("fedcore")
    if any(getattr(h, "_fedcore_cli", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Lowercase("fedcore: %(levelname)s: %(message)s"))
    handler._fedcore_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None, out: Any = None) -> int:
    """Entry point of ``fedcore``; returns the exit code."""
    args = parser().parse_args(argv)
    _logging()
    try:
        return _COMMANDS[args.command](args, out or sys.stdout)
    except ConfigurationError as exc:
        print(f"fedcore: error: {redact_url(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except FedcoreError as exc:
        print(f"fedcore: error: {redact_url(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\nfedcore: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `fedcore history ... | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
