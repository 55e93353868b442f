"""The commands of ``fedcore``: run, resume, nodes, history, identity, enroll.

Each function carries out one parsed command, writes its result to ``out`` and returns the
exit code; errors propagate as ``FedcoreError`` for ``cli.main`` to report.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from fedcore import Experiment, TrainingPlan
from fedcore.errors import ConfigurationError, DatasetError, FedcoreError, RoundError
from fedcore.transport import redact_url
from fedcore.wire import identity as keys
from fedcore_researcher import _output, _run_folder
from fedcore_researcher._experiment_file import open_experiment

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

log = logging.getLogger("fedcore_researcher")


class ListingPlan(TrainingPlan):
    """Stands in for a plan where nothing trains: listing nodes, reading a history.

    It is never shipped to a node, and reading a checkpoint through it does not execute
    the plan source stored in the checkpoint.
    """

    # No annotations here: the class's source is collected like any plan's, and every name
    # it reads must be shippable.
    backend = "none"

    def build(self, seed):  # type: ignore[no-untyped-def]  # noqa: D102
        raise NotImplementedError

    def get_parameters(self):  # type: ignore[no-untyped-def]  # noqa: D102
        raise NotImplementedError

    def set_parameters(self, params):  # type: ignore[no-untyped-def]  # noqa: D102
        raise NotImplementedError

    def fit(self, dataset, seed):  # type: ignore[no-untyped-def]  # noqa: D102
        raise NotImplementedError

    def predict(self, dataset):  # type: ignore[no-untyped-def]  # noqa: D102
        raise NotImplementedError


# --- run and resume -------------------------------------------------------------------------


def run(args: argparse.Namespace, out: Any) -> int:
    """``fedcore run FILE``: build the experiment and run it up to its round limit."""
    with open_experiment(args.file, federation=args.federation, rounds=args.rounds) as exp:
        if args.checkpoint_dir is not None:
            exp.checkpoint_dir = Path(args.checkpoint_dir).resolve()
        elif exp.checkpoint_dir is not None:  # the checkpoints record where they go
            exp.checkpoint_dir = Path(exp.checkpoint_dir).resolve()
        _settings(exp, args)
        if exp.round_limit is None:
            raise ConfigurationError(f"{args.file} sets no number of rounds: add rounds = N "
                                     "(round_limit= in Python) or pass --rounds N.")
        _run_folder.remember(exp)
        return _drive(exp, args, out)


def resume(args: argparse.Namespace, out: Any) -> int:
    """``fedcore resume CHECKPOINT``: load it and run the rounds left."""
    source = Path(args.checkpoint)
    overrides: dict[str, Any] = {"progress": not args.quiet}
    remembered = _run_folder.recall(source if source.is_dir() else source.parent)
    for key in ("identity", "enrolled"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
        elif key in remembered:
            overrides[key] = remembered[key]
    exp = load_checkpoint(source, federation=args.federation, **overrides)
    try:
        if args.checkpoint_dir is not None:
            exp.checkpoint_dir = Path(args.checkpoint_dir).resolve()
        elif exp.checkpoint_dir is not None:
            # Keep writing where the checkpoint is now (the folder may have moved).
            exp.checkpoint_dir = (source if source.is_dir() else source.parent).resolve()
        if args.rounds is not None:
            exp.round_limit = exp.round + args.rounds
        elif exp.round_limit is None:
            raise ConfigurationError(f"{source} was written by an experiment without a round "
                                     "limit: pass --rounds N (that many more rounds).")
        _run_folder.remember(exp)
        return _drive(exp, args, out)
    finally:
        exp.close()


def load_checkpoint(path: Path, **kwargs: Any) -> Experiment:
    """``Experiment.load``, with a checkpoint that lacks what it should hold reported."""
    try:
        return Experiment.load(path, **kwargs)
    except FedcoreError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigurationError(f"{path} is not a complete fedcore checkpoint "
                                 f"({type(exc).__name__}: {exc}). Pass a file written by "
                                 "Experiment.save() or a run with --checkpoint-dir.") from exc


def _settings(exp: Experiment, args: argparse.Namespace) -> None:
    exp.progress = not args.quiet
    if args.identity is not None:
        exp.identity = args.identity
    if args.enrolled is not None:
        exp.enrolled = args.enrolled


def _drive(exp: Experiment, args: argparse.Namespace, out: Any) -> int:
    """Run up to ``round_limit``; print the outcome; the exit code."""
    assert exp.round_limit is not None
    if exp.round >= exp.round_limit and not args.json:
        print(f"Nothing to run: the experiment is at round {exp.round} of "
              f"{exp.round_limit}. Pass --rounds N for N more rounds.", file=sys.stderr)
    try:
        exp.run()
    except KeyboardInterrupt:
        exp.close()
        checkpoint = _output.newest_checkpoint(exp.checkpoint_dir)
        where = (f"; resume with: fedcore resume {checkpoint.parent}" if checkpoint
                 else " (no checkpoint: pass --checkpoint-dir DIR to be able to resume)")
        print(f"\nfedcore: interrupted after round {exp.round}{where}", file=sys.stderr)
        if args.json:
            print(_output.dumps(_output.summary(exp, "interrupted", checkpoint)), file=out)
        return EXIT_INTERRUPTED
    except RoundError as exc:
        exp.close()
        checkpoint = _output.newest_checkpoint(exp.checkpoint_dir)
        print(f"fedcore: error: {redact_url(_without_details(str(exc), exc.failures))}",
              file=sys.stderr)
        for node, reason in sorted(exc.failures.items()):
            print(f"  {node}: {redact_url(str(reason))}", file=sys.stderr)
        if checkpoint is not None:
            print(f"The last checkpoint is {checkpoint} (round {exp.round}); resume with: "
                  f"fedcore resume {checkpoint.parent}", file=sys.stderr)
        if args.json:
            print(_output.dumps(_output.summary(exp, "failed", checkpoint, str(exc),
                                                exc.failures)), file=out)
        return EXIT_FAILED
    checkpoint = _output.newest_checkpoint(exp.checkpoint_dir)
    if args.json:
        print(_output.dumps(_output.summary(exp, "completed", checkpoint)), file=out)
    else:
        print(_output.report(exp, checkpoint), file=out)
    return EXIT_OK


def _without_details(message: str, failures: dict[str, Any]) -> str:
    """A RoundError's message up to its list of node errors (printed one per line)."""
    cuts = [message.find(f"{node}: ") for node in failures]
    cut = min([c for c in cuts if c > 0], default=len(message))
    return message[:cut].rstrip(" ;")


# --- nodes ----------------------------------------------------------------------------------


def nodes(args: argparse.Namespace, out: Any) -> int:
    """``fedcore nodes``: the connected nodes, and their datasets tagged ``--tags``."""
    expected = args.nodes
    if expected is None and not args.federation.startswith("inproc:"):
        expected = sorted(keys.enrolled_nodes(args.enrolled)) or None  # wait for every one
    exp = Experiment(ListingPlan, tags=args.tags or ["-"], federation=args.federation,
                     nodes=expected, connect_timeout=args.wait, progress=False,
                     identity=args.identity, enrolled=args.enrolled, name="fedcore-nodes")
    try:
        status = exp.node_status()
        connected = status.loc[status["connected"], "node"].tolist() if len(status) else []
        datasets = None
        note = None
        if args.tags and connected:
            exp.nodes = connected
            try:
                datasets = exp.search()
            except DatasetError as exc:
                note = str(exc)
    finally:
        exp.close()
    status = status.drop(columns=["dataset"])
    if args.json:
        doc: dict[str, Any] = {"federation": exp.federation,
                               "nodes": _output.records(status)}
        if args.tags:
            doc.update(tags=list(args.tags), datasets=[] if datasets is None
                       else _output.records(datasets))
        print(_output.dumps(doc), file=out)
    else:
        print(_output.frame_table(status) if len(status) else
              f"No node is connected to {exp.federation}.", file=out)
        if datasets is not None:
            shown = datasets.drop(columns=["metadata"])
            print(f"\nDatasets tagged {', '.join(args.tags)}:", file=out)
            print(_output.frame_table(shown), file=out)
    if note:
        print(f"fedcore: {note}", file=sys.stderr)
    if not connected:
        print(f"fedcore: no node connected to {exp.federation} within {args.wait:g} s. "
              "Check that the nodes run (`fedcore-node status`), that their federation URL "
              "points here, and that they are enrolled.", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


# --- history --------------------------------------------------------------------------------


def history(args: argparse.Namespace, out: Any) -> int:
    """``fedcore history CHECKPOINT``: the per-node, per-round history, or the metrics."""
    # The stand-in plan: reading a history never executes the plan stored in the checkpoint.
    exp = load_checkpoint(Path(args.checkpoint), plan=ListingPlan, progress=False)
    if args.metrics:
        frame = exp.metrics(args.which)
    else:
        frame = _output.history_frame(exp, everything=args.csv or args.json)
    if args.csv:
        frame.to_csv(out, index=False)
    elif args.json:
        print(_output.dumps(_output.records(frame)), file=out)
    elif frame.empty:
        print("The checkpoint holds no round yet.", file=out)
    else:
        print(_output.frame_table(frame), file=out)
    return EXIT_OK


# --- identity and enrollment ----------------------------------------------------------------


def identity(args: argparse.Namespace, out: Any) -> int:
    """``fedcore identity``: the researcher's public key (the key is created on first use)."""
    existed = keys.researcher_key_file(args.identity).exists()
    me = keys.researcher_identity(args.identity)
    if args.json:
        print(_output.dumps({"public_key": me.public_key, "fingerprint": me.fingerprint,
                             "key_file": str(me.path), "created": not existed}), file=out)
        return EXIT_OK
    print(f"public key:  {me.public_key}\nfingerprint: {me.fingerprint}\n"
          f"key file:    {me.path}{'' if existed else ' (created now)'}\n\n"
          "Each node's administrator trusts this researcher with: fedcore-node trust add "
          f"NAME {me.public_key}", file=out)
    return EXIT_OK


def enroll(args: argparse.Namespace, out: Any) -> int:
    """``fedcore enroll NODE_ID KEY``: accept a node's key (``fedcore-node identity``)."""
    raw = keys.parse_public_key(args.key)
    file = keys.enroll(args.node_id, args.key, args.enrolled)
    print(f"Enrolled node {args.node_id!r} ({keys.fingerprint(raw)}) in {file}", file=out)
    return EXIT_OK

