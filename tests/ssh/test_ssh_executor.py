"""The executor against real sshd nodes: commands, env, output, concurrency, reuse, timeouts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from ssh_lab import SshLab

from fleet.errors import AuthError, CommandTimeout, UsageError
from fleet.ssh import NodeUnreachable, Target


def test_per_node_commands_env_exit_codes_and_tails(trio: SshLab, trio_targets: list[Target]) -> None:
    ranks = {target.name: index for index, target in enumerate(trio_targets)}
    with trio.executor() as executor:
        result = executor.run(
            trio_targets,
            lambda t: f"echo node=$FLEET_NODE_NAME rank=$RANK; pwd; echo oops >&2; exit {ranks[t.name]}",
            env=lambda t: {"FLEET_NODE_NAME": t.name, "RANK": str(ranks[t.name])},
        )
    assert list(result.results) == [t.name for t in trio_targets]  # target order
    for node, target in zip(trio.nodes, trio_targets):
        one = result[target.name]
        assert one.exit_code == ranks[target.name]
        assert one.stdout.splitlines() == [f"node={target.name} rank={ranks[target.name]}", str(node.home)]
        assert one.stderr == "oops\n"
        assert one.error is None
        assert one.duration > 0
    assert [r.node for r in result.succeeded.values()] == [trio_targets[0].name]
    assert set(result.failed) == {trio_targets[1].name, trio_targets[2].name}
    assert not result.ok
    assert "1/3 nodes succeeded" in result.summary()
    assert f"{trio_targets[2].name} (exit 2)" in result.summary()
    described = result[trio_targets[2].name].describe()
    assert trio_targets[2].name in described and "exited with 2" in described
    assert "--- stderr" in described and "oops" in described


def test_output_tail_keeps_the_end_and_streaming_prefixes_lines(
    trio: SshLab, trio_targets: list[Target]
) -> None:
    lines: list[tuple[str, str, str]] = []
    lock = threading.Lock()

    def on_line(node: str, stream: str, line: str) -> None:
        with lock:
            lines.append((node, stream, line))

    with trio.executor(on_line=on_line, max_output=1000) as executor:
        result = executor.run(
            trio_targets[:2], "for i in $(seq 1 300); do echo line$i; done; echo bad >&2", stream=True
        )
        quiet = executor.run(trio_targets[:1], "echo not streamed")
    assert result.ok
    for target in trio_targets[:2]:
        one = result[target.name]
        assert one.truncated and one.stdout.endswith("line299\nline300\n") and len(one.stdout) <= 1000
        streamed = [line for node, stream, line in lines if node == target.name and stream == "stdout"]
        assert streamed == [f"line{i}" for i in range(1, 301)]
        assert (target.name, "stderr", "bad") in lines
        assert "line300" in one.describe() and "line280" not in one.describe()
    assert quiet.ok and not any(line == "not streamed" for _, _, line in lines)


def test_parallelism_bound_is_respected(lab: SshLab, tmp_path: Path) -> None:
    nodes = [lab.node(f"par-n{index}") for index in range(6)]
    targets = [lab.target(node) for node in nodes]
    marks = tmp_path / "running"
    marks.mkdir()
    # Every command registers itself, counts who is running with it, and stays a while.
    command = f"touch {marks}/$N; ls {marks} | wc -l > {tmp_path}/seen-$N; sleep 0.6; rm {marks}/$N"

    def most_concurrent(parallelism: int) -> int:
        with lab.executor(parallelism=parallelism) as executor:
            result = executor.run(targets, command, env=lambda t: {"N": t.name})
        assert result.ok, result.summary()
        return max(int((tmp_path / f"seen-{t.name}").read_text()) for t in targets)

    assert most_concurrent(2) == 2
    assert most_concurrent(6) >= 3  # the probe does see concurrency when it is allowed


def test_connections_are_opened_once_and_reused(
    trio: SshLab, trio_targets: list[Target], accepted_logins
) -> None:
    before = [accepted_logins(node) for node in trio.nodes]
    with trio.executor() as executor:
        assert executor.run(trio_targets, "true").ok
        first = [executor.transport(t) for t in trio_targets]
        assert executor.run(trio_targets, "echo again").ok
        assert executor.put(trio_targets, b"x", "reuse/x.txt").ok
        assert executor.run(trio_targets, "cat reuse/x.txt").ok
        assert [executor.transport(t) for t in trio_targets] == first
        assert all(a is b for a, b in zip(first, [executor.transport(t) for t in trio_targets]))
    time.sleep(0.2)  # sshd writes its log line after the login
    after = [accepted_logins(node) for node in trio.nodes]
    assert [a - b for a, b in zip(after, before)] == [1, 1, 1]


def test_dead_transport_is_reopened_and_drop_forgets(trio: SshLab, trio_targets: list[Target]) -> None:
    target = trio_targets[0]
    with trio.executor() as executor:
        assert executor.run([target], "true").ok
        first = executor.transport(target)
        first.close()  # as if the network had dropped it
        assert executor.run([target], "true").ok
        second = executor.transport(target)
        assert second is not first and second.is_active()
        executor.drop(target.name)
        assert not second.is_active()
        assert executor.transport(target) is not second


def test_command_timeout_closes_the_channel_and_spares_the_others(
    trio: SshLab, trio_targets: list[Target]
) -> None:
    slow, fast = trio_targets[0], trio_targets[1]
    with trio.executor(command_timeout=30) as executor:
        started = time.monotonic()
        result = executor.run([slow, fast], lambda t: "sleep 20" if t is slow else "echo fast", timeout=1.0)
        elapsed = time.monotonic() - started
        assert elapsed < 4
        assert isinstance(result[slow.name].error, CommandTimeout)
        assert result[slow.name].exit_code is None
        assert "1s" in str(result[slow.name].error)
        assert result[fast.name].ok and result[fast.name].stdout == "fast\n"
        # The connection stays usable for the next command.
        assert executor.run([slow], "echo still here")[slow.name].stdout == "still here\n"


def test_unreachable_and_hung_nodes_fail_alone_within_the_connect_timeout(
    trio: SshLab, trio_targets: list[Target], closed_port: int, hung_listener: int
) -> None:
    refused = Target("gone-node", "127.0.0.1", closed_port, "root", trust_on_first_use=True)
    hung = Target("hung-node", "127.0.0.1", hung_listener, "root", trust_on_first_use=True)
    with trio.executor(connect_timeout=1.5) as executor:
        started = time.monotonic()
        result = executor.run([refused, *trio_targets, hung], "echo up")
        elapsed = time.monotonic() - started
    assert elapsed < 4.0, elapsed
    assert all(result[t.name].ok for t in trio_targets)
    assert isinstance(result["gone-node"].error, NodeUnreachable)
    assert "refused" in str(result["gone-node"].error).lower()
    assert result["gone-node"].duration < 1.0
    assert isinstance(result["hung-node"].error, NodeUnreachable)
    assert 1.0 <= result["hung-node"].duration < 3.0
    assert "2/4" not in result.summary() and "3/5 nodes succeeded" in result.summary()
    assert trio.store.get("hung-node") is None and trio.store.get("gone-node") is None


def test_a_killed_node_fails_alone(lab: SshLab) -> None:
    nodes = [lab.node(f"kill-n{index}") for index in range(2)]
    targets = [lab.target(node) for node in nodes]
    with lab.executor(connect_timeout=2) as executor:
        assert executor.run(targets, "true").ok
        nodes[0].kill()
        result = executor.run(targets, "echo alive")
    assert result[targets[1].name].ok
    assert isinstance(result[targets[0].name].error, NodeUnreachable)


def test_connect_retries_wait_for_a_booting_node(lab: SshLab, closed_port: int) -> None:
    # The node's sshd comes up 1 s after the first attempt, on the port it was given.
    starter = threading.Timer(1.0, lambda: lab.node("late-node", port=closed_port))
    starter.start()
    try:
        target = Target(
            "late-node",
            "127.0.0.1",
            closed_port,
            lab.nodes[0].user if lab.nodes else _me(),
            trust_on_first_use=True,
        )
        with lab.executor(connect_timeout=2) as executor:
            started = time.monotonic()
            result = executor.wait_ready([target], timeout=20)
            assert result.ok, result.summary()
            assert time.monotonic() - started >= 0.8
            assert executor.run([target], "echo hi", retries_connect=0).ok
    finally:
        starter.join()


def test_wait_ready_gives_up_at_its_timeout(lab: SshLab, closed_port: int) -> None:
    target = Target("never-node", "127.0.0.1", closed_port, _me(), trust_on_first_use=True)
    with lab.executor(connect_timeout=1) as executor:
        started = time.monotonic()
        result = executor.wait_ready([target], timeout=1.5)
        elapsed = time.monotonic() - started
    assert 1.4 <= elapsed < 3.0
    error = result["never-node"].error
    assert isinstance(error, NodeUnreachable) and "did not become ready within 1.5s" in str(error)


def test_auth_failure_names_node_and_key_path_and_is_not_retried(lab: SshLab, tmp_path: Path) -> None:
    other_key = tmp_path / "other_key"
    from fleet.providers.localnode import generate_ed25519_keypair

    node = lab.node("locked-node", authorized_keys=[generate_ed25519_keypair(other_key, "other")])
    target = lab.target(node)
    with lab.executor(connect_timeout=3) as executor:
        started = time.monotonic()
        result = executor.wait_ready([target], timeout=20)
        elapsed = time.monotonic() - started
    error = result[node.name].error
    assert isinstance(error, AuthError)
    assert node.name in str(error) and str(lab.key) in str(error)
    private = lab.key.read_text()
    body = "".join(private.splitlines()[1:-1])
    assert body[:40] not in str(error) and lab.public_key.split()[1] not in str(error)
    assert elapsed < 3


def test_bad_env_names_and_node_names_fail_before_anything_runs(
    trio: SshLab, trio_targets: list[Target], accepted_logins
) -> None:
    before = [accepted_logins(node) for node in trio.nodes]
    with trio.executor() as executor:
        with pytest.raises(UsageError, match="invalid environment variable name"):
            executor.run(trio_targets, "true", env={"A;touch x": "1"})
        with pytest.raises(UsageError, match="twice"):
            executor.run([trio_targets[0], trio_targets[0]], "true")
        sneaky = Target(
            "n1; touch /tmp/x",
            trio_targets[0].address,
            trio_targets[0].port,
            trio_targets[0].user,
            trust_on_first_use=True,
        )
        with pytest.raises(UsageError, match="invalid node name"):
            executor.run([sneaky], "true")
    time.sleep(0.1)
    assert [accepted_logins(node) for node in trio.nodes] == before


def _me() -> str:
    import getpass

    return getpass.getuser()


def test_channels_per_node_stay_below_sshds_max_sessions(
    trio: SshLab, trio_targets: list[Target], tmp_path: Path
) -> None:
    from fleet.ssh.executor import SESSIONS_PER_NODE

    target = trio_targets[0]
    marks = tmp_path / "sessions"
    marks.mkdir()
    command = f"touch {marks}/$$; ls {marks} | wc -l >> {tmp_path}/seen; sleep 0.4; rm {marks}/$$"
    with trio.executor(parallelism=32) as executor:
        assert executor.run([target], "true").ok  # one connection for all the calls below
        with ThreadPoolExecutor(max_workers=14) as callers:
            results = list(callers.map(lambda _: executor.run([target], command), range(14)))
    assert all(result.ok for result in results), [r.summary() for r in results]
    seen = [int(line) for line in (tmp_path / "seen").read_text().split()]
    assert max(seen) == SESSIONS_PER_NODE


def test_stdin_reaches_every_command_also_one_that_writes_before_it_reads(
    trio: SshLab, trio_targets: list[Target]
) -> None:
    data = bytes(range(256)) * 12_000  # 3 MB: more than one SSH window
    digest = __import__("hashlib").sha256(data).hexdigest()
    with trio.executor() as executor:
        # 4 MB of output before the command reads its input: neither side may wait on the other.
        result = executor.run(trio_targets, "head -c 4000000 /dev/zero | tr '\\0' x >&2; sha256sum", stdin=data,
                              timeout=60)
        plain = executor.run(trio_targets[:1], "cat; echo end", timeout=10)
    for target in trio_targets:
        assert result[target.name].ok, result[target.name].describe()
        assert result[target.name].stdout.split()[0] == digest
    assert plain[trio_targets[0].name].stdout == "end\n"  # without stdin a reader sees EOF at once


def test_stdin_parts_come_as_they_are_ready_and_a_failing_source_still_ends_the_input(
    trio: SshLab, trio_targets: list[Target]
) -> None:
    """A function of the target gives each command its own parts; a part may wait for
    what the caller learns from the command's own output (on_line), and a source that
    fails ends the input instead of leaving the command waiting."""
    first, second = trio_targets[0], trio_targets[1]
    asked = threading.Event()

    def parts(target: Target) -> Iterator[bytes]:
        yield f"hello {target.name}\n".encode()
        if target.name == first.name:
            assert asked.wait(30)  # the command said it waits for the rest
            yield b"the rest\n"
        else:
            raise RuntimeError("the source broke")

    def on_line(node: str, stream: str, line: str) -> None:
        if node == first.name and line == "waiting":
            asked.set()

    with trio.executor() as executor:
        started = time.monotonic()
        result = executor.run([first, second], 'read -r a; echo waiting; read -r b || b=eof; echo "$a|$b"',
                              stdin=parts, on_line=on_line, timeout=30)
    assert result[first.name].stdout.splitlines() == ["waiting", f"hello {first.name}|the rest"]
    assert result[second.name].stdout.splitlines() == ["waiting", f"hello {second.name}|eof"]
    assert time.monotonic() - started < 20
