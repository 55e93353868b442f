"""``fedcore-node init``: a node home, and from flags everything it needs to serve.

With ``--trust``, ``--data`` and ``--federation`` one command creates the home and the
node's key, trusts the researcher, registers a dataset and stores the researcher's URL; it
then prints the one line the researcher runs to enroll the node. Every flag is checked
before anything is written: a home that did not exist is removed again when a step fails.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
from pathlib import Path
from typing import Any

from fedcore.errors import ConfigurationError
from fedcore.node import Node
from fedcore.wire.identity import fingerprint, parse_public_key

INIT_EPILOG = """\
A node from nothing to serving: this, then `fedcore-node start`.

examples:
  fedcore-node --home ~/fedcore-node init --name "Hospital A" --id site-a
  fedcore-node --home ~/fedcore-node init --id site-a \\
      --trust alice=RESEARCHER_KEY \\
      --data cohort.csv --tags diabetes,2024 \\
      --federation ws://researcher.example.org:8765
  fedcore-node --home ~/fedcore-node init --id site-a --dataset cohort.toml \\
      --policy approval_required=false     # a test bench, not a hospital

RESEARCHER_KEY is what `fedcore identity` prints on the researcher's machine. The last
line printed is the command the researcher runs to enroll this node.
"""


def add_parser(sub: Any) -> None:
    """Add ``init`` to ``fedcore-node``'s parser."""
    init = sub.add_parser(
        "init", help="create the node home; with flags also trust a researcher, register "
        "a dataset and set the federation URL",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=INIT_EPILOG,
        description="Create the node home (config, database, audit log, the node's key) or "
        "update an existing one, and print the line that enrolls the node on the "
        "researcher's side.")
    init.set_defaults(init_parser=init)
    init.add_argument("--name", help="a human-readable name, e.g. the hospital's")
    init.add_argument("--id", dest="node_id", help="the node id (default: generated)")
    init.add_argument("--federation", metavar="URL", help="the researcher's URL that "
                      "`fedcore-node start` connects to, e.g. ws://researcher.org:8765")
    init.add_argument("--trust", action="append", default=[], metavar="NAME=KEY",
                      help="trust a researcher's public key (printed by `fedcore identity`) "
                      "under NAME; repeatable")
    init.add_argument("--data", metavar="PATH", help="register this data file or folder "
                      "(with --tags; the kind comes from the suffix, or --kind)")
    init.add_argument("--tags", help="with --data: comma-separated tags, e.g. diabetes,2024")
    init.add_argument("--dataset-name", metavar="NAME",
                      help="with --data: the name researchers see (default: the file's stem)")
    init.add_argument("--kind", help="with --data: csv, npz, medical-folder, image-folder")
    init.add_argument("--dataset", metavar="FILE", help="register the dataset a "
                      "description file (TOML, see `dataset add --help`) describes")
    init.add_argument("--policy", action="append", default=[], metavar="KEY=VALUE",
                      help="a policy setting, as `policy set` takes it; repeatable")


def _trusted(items: list[str], parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        name, sep, key = item.partition("=")
        if not sep or not name.strip() or not key.strip():
            parser.error(f"--trust expects NAME=KEY (KEY: what `fedcore identity` prints), "
                         f"got {item!r}")
        try:
            parse_public_key(key.strip())
        except ConfigurationError as exc:
            raise ConfigurationError(f"--trust {name.strip()}: {exc}") from exc
        pairs.append((name.strip(), key.strip()))
    return pairs


def _dataset(args: argparse.Namespace) -> dict[str, Any] | None:
    from fedcore_node._commands import load_description

    parser: argparse.ArgumentParser = args.init_parser
    extras = [f for f, v in (("--tags", args.tags), ("--dataset-name", args.dataset_name),
                             ("--kind", args.kind)) if v]
    if args.dataset and (args.data or extras):
        parser.error("--dataset FILE replaces --data, --tags, --dataset-name and --kind: "
                     "give one or the other")
    if args.dataset:
        return load_description(args.dataset)
    if extras and not args.data:
        parser.error(f"{', '.join(extras)}: only with --data PATH (the dataset they "
                     "describe)")
    if not args.data:
        return None
    if not args.tags:
        parser.error("--data needs --tags (comma-separated), e.g. --tags diabetes,2024")
    path = Path(args.data).expanduser()
    return {"name": args.dataset_name or path.stem, "path": str(path.resolve()),
            "tags": [t.strip() for t in args.tags.split(",") if t.strip()],
            "kind": args.kind}


def init(args: argparse.Namespace, out: Any) -> int:
    """``fedcore-node init``: create or update the home; print the enrollment line."""
    from fedcore_node._commands import _admin, _policy_changes

    trusted = _trusted(args.trust, args.init_parser)
    dataset = _dataset(args)
    if args.federation:
        _check_url(args.federation)
    home = Path(args.home).expanduser()
    created = not (home / "config.toml").exists()
    try:
        node = Node(home, name=args.name, node_id=args.node_id)
        by = _admin()
        if args.policy:
            with node.db.transaction():
                node.set_policy(by=by, **_policy_changes(args.policy, node))
        for name, key in trusted:
            node.trust(name, key, by=by)
        entry = node.datasets.add(**dataset, by=by) if dataset is not None else None
        if args.federation:
            node.set_federation(args.federation, by=by)
        public_key = node.identity.public_key  # created here, on first use
    except BaseException:
        if created and home.exists():  # nothing half-made is left behind
            shutil.rmtree(home, ignore_errors=True)
        raise
    lines = [f"Node {node.node_id} ready in {node.home.resolve()} (training plans need "
             "approval: see `fedcore-node plan --help`)"
             if node.policy["approval_required"] else
             f"Node {node.node_id} ready in {node.home.resolve()} (approval off: any plan "
             "of a trusted researcher runs)"]
    lines += [f"Trusted researcher {name!r} ({fingerprint(parse_public_key(key))})."
              for name, key in trusted]
    if entry is not None:
        lines.append(f"Registered {entry['name']!r} as {entry['id']} "
                     f"({entry['metadata'].get('n_samples', '?')} samples, tags "
                     f"{entry['tags']})")
    federation = node.config.get("federation")
    lines.append(f"Federation: {_redacted(federation)}" if federation else
                 "No federation URL yet: pass --federation URL here or to `start`.")
    if not node.trusted_researchers:
        lines.append("No trusted researcher yet: on a network this node refuses every "
                     "request. Add one with --trust NAME=KEY (here) or `trust add`.")
    lines += [f"Start it with: fedcore-node --home {shlex.quote(args.home)} start",
              f"Node key fingerprint: {node.identity.fingerprint}",
              "The researcher enrolls this node with:",
              f"fedcore enroll {node.node_id} {public_key}"]
    print("\n".join(lines), file=out)
    return 0


def _check_url(url: str) -> None:
    """The checks of ``Node.set_federation``, before anything is written."""
    from urllib.parse import urlsplit

    from fedcore import plugins
    from fedcore.transport import redact_url

    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        raise ConfigurationError(f"--federation: expected a URL such as "
                                 f"ws://host:port. Received: {redact_url(url)!r}")
    plugins.load("transports", parts.scheme)


def _redacted(url: str) -> str:
    from fedcore.transport import redact_url

    return redact_url(url)
