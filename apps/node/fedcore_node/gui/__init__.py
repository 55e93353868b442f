"""The node administration web GUI: ``fedcore-node gui``.

Server-rendered pages (Flask and Jinja, no JavaScript, no front-end build): status,
datasets, training plans (approve or reject), policy, audit log, users. Needs the ``gui``
extra: ``pip install -c constraints.txt ".[gui]"``.
"""

from fedcore_node.gui.app import create_app, make_gui_server, serve

__all__ = ["create_app", "make_gui_server", "serve"]
