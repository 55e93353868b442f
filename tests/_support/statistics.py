"""Simulated hospitals with one CSV each, for the federated-statistics tests."""

from __future__ import annotations

from fedcore import Node, simulate


def federation(tmp_path, frames, configs=None, kinds=None, node_class=Node):
    """Hospitals with one CSV each; ``configs`` adds lines to a node's config.toml, ``kinds``
    gives a node another class than ``node_class``."""
    fed = simulate.SimulatedFederation(root=tmp_path / "fed")
    for i, frame in enumerate(frames):
        node_id = f"node-{i + 1:02d}"
        home = fed.root / node_id
        home.mkdir(parents=True)
        extra = (configs or {}).get(node_id, "")
        (home / "config.toml").write_text(f'node_id = "{node_id}"\n{extra}\n')
        node = fed.add_node(node_id, node_class=(kinds or {}).get(node_id, node_class))
        path = tmp_path / f"{node_id}.csv"
        frame.to_csv(path, index=False)
        node.datasets.add(f"cohort-{i + 1}", ["cohort"], path)
    return fed
