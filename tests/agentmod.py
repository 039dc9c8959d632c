"""The node agent (templates/agent.py) imported as a module, as the nodes run it: beside
node_ctl.py, standard library only."""

import importlib.util
import sys

from mlcloud import templates

_spec = importlib.util.spec_from_file_location("mlcloud_node_agent", templates.path("agent.py"))
agent = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = agent
_spec.loader.exec_module(agent)
