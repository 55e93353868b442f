"""fedcore-node: the node administrator's command line."""
