"""fleet: run big offline GPU batch jobs on fleets of preemptible/spot machines.

The control plane (spec, state, providers, ssh, fleetops, monitor, jobs, report, cli)
runs on your laptop; `fleet.worker` runs on the nodes and never imports the control
plane. The control plane never imports torch. `fleet.connect("fleet.yaml")` opens a
running fleet from a program (`fleet.serve`: call the models of `fleet serve`).
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `fleet.connect` without importing the control plane into `fleet.worker` on the nodes
    if name in ("connect", "Connection", "ServingError", "ServingTimeout"):
        import fleet.serve

        return getattr(fleet.serve, name)
    raise AttributeError(f"module 'fleet' has no attribute {name!r}")
