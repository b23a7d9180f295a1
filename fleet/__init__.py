"""fleet: run big offline GPU batch jobs on fleets of preemptible/spot machines.

The control plane (spec, state, providers, ssh, fleetops, monitor, jobs, report, cli)
runs on your laptop; `fleet.worker` runs on the nodes and never imports the control
plane. The control plane never imports torch.
"""

__version__ = "0.1.0"
