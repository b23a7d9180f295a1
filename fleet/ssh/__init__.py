"""SSH for the control plane: run commands and move files on many nodes at once.

`Executor` (executor.py) runs commands in parallel over reused paramiko connections;
`HostKeyStore` (hostkeys.py) pins host keys by node name in the fleet's known_hosts;
`write_ssh_config` / `interactive_ssh_argv` (config.py) let the OpenSSH client, sshfs
and rsync use the same key and pinned host keys; quote.py quotes what goes into shells.
"""

from fleet.ssh.config import include_line, interactive_ssh_argv, render_ssh_config, write_ssh_config
from fleet.ssh.connection import NodeUnreachable
from fleet.ssh.executor import Executor, TreeLimits
from fleet.ssh.hostkeys import HostKeyStore, PinnedHostKeyPolicy
from fleet.ssh.quote import env_prefix, quote, shell_join, with_env
from fleet.ssh.results import CommandResult, GroupResult, Target

__all__ = [
    "CommandResult",
    "Executor",
    "GroupResult",
    "HostKeyStore",
    "NodeUnreachable",
    "PinnedHostKeyPolicy",
    "Target",
    "TreeLimits",
    "env_prefix",
    "include_line",
    "interactive_ssh_argv",
    "quote",
    "render_ssh_config",
    "shell_join",
    "with_env",
    "write_ssh_config",
]
