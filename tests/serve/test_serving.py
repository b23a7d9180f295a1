"""`fleet serve` + `fleet.connect(...).serving(name)` on a real local fleet with the real
model: results, batching across callers, hooks, errors, draining and failover.

One served fleet (see serve_fleet.py) is shared by the module; the tests that break it
(preemption, the dead fleet) come last, in that order.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from jobs_fleet import node_processes_matching, wait_for

import fleet
from fleet.serve import ServingError, ServingTimeout

pytestmark = pytest.mark.slow

TEXTS = [f"text {i}: {'a fleet of cheap machines serves one model to many callers ' * (1 + i % 5)}"
         for i in range(128)]


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    """A direct `encode` of every text in this process, with the same model."""
    from sentence_transformers import SentenceTransformer

    from fleet.worker.handlers.text_embed import default_model_path

    model = SentenceTransformer(str(default_model_path()), device="cpu", local_files_only=True)
    return dict(zip(TEXTS, model.encode(TEXTS, batch_size=64, convert_to_numpy=True)))


def _batches(served, job: str) -> tuple[int, int]:
    """(items, batches) the job's model processes ran, summed over the nodes."""
    items = batches = 0
    for record in served.registry(job):
        health = _health(served, record)
        items += health["items"]
        batches += health["batches"]
    return items, batches


def _health(served, record: dict) -> dict:
    return served.fleet.server_health(record)


def _callers_at_once(count: int, work) -> list[BaseException]:
    """`work(k)` in `count` threads started together; what they raised."""
    start = threading.Barrier(count)
    failures: list[BaseException] = []

    def caller(k: int) -> None:
        try:
            start.wait()
            work(k)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "callers still blocked"
    return failures


def _terminate(served, record: dict) -> None:
    """SIGTERM the server process, what a preemption notice or `fleet cancel` sends (its
    pid is the node's: an isolated node has a PID namespace of its own)."""
    if served.fleet.isolated:
        served.fleet.cli("exec", "--nodes", record["node"], "--", f"kill -TERM {int(record['pid'])}", check=True)
    else:
        os.kill(record["pid"], signal.SIGTERM)


def test_unknown_serving_is_a_clear_error(served_fleet) -> None:
    with fleet.connect(served_fleet.fleet.spec_path) as f:
        started = time.monotonic()
        with pytest.raises(ServingError, match="no serving named 'nope'") as caught:
            f.serving("nope")
        assert "fleet jobs" in str(caught.value) and time.monotonic() - started < 5


def test_64_threads_with_single_items_get_their_own_results(served_fleet, reference) -> None:
    items_before, batches_before = _batches(served_fleet, "embed")
    got: dict[str, list[np.ndarray]] = {}
    lock = threading.Lock()
    with fleet.connect(served_fleet.fleet.spec_path) as f:
        embed = f.serving("embed", timeout=120)

        def caller(k: int) -> None:
            for text in TEXTS[k::64]:
                vector = embed.batched_run(text)
                with lock:
                    got.setdefault(text, []).append(vector)

        failures = _callers_at_once(64, caller)
        assert not failures, failures[:3]
        stats = embed.stats()
    assert sorted(got) == sorted(TEXTS)
    for text, vectors in got.items():
        assert len(vectors) == 1
        np.testing.assert_allclose(vectors[0], reference[text], atol=1e-4)
    assert stats["calls"] == len(TEXTS) and stats["items"] == len(TEXTS) and stats["resent"] == 0
    assert set(stats["answered_by"]) == {served_fleet.fleet.worker(1), served_fleet.fleet.worker(2)}
    items, batches = _batches(served_fleet, "embed")
    assert items - items_before == len(TEXTS)
    assert (items - items_before) / (batches - batches_before) > 1, "every batch held one item"


def test_single_items_of_concurrent_callers_share_requests(served_fleet) -> None:
    """The servers' own counts: 64 callers' single items reach them in few requests, so
    their batches are not capped by what one request carries."""
    before = [_health(served_fleet, record) for record in served_fleet.registry("embed")]
    with fleet.connect(served_fleet.fleet.spec_path) as f:
        embed = f.serving("embed", timeout=120)
        failures = _callers_at_once(64, lambda k: [embed.batched_run(text) for text in TEXTS[k::64]])
        assert not failures, failures[:3]
        stats = embed.stats()
    after = {(h["node"], h["proc"]): h for h in
             (_health(served_fleet, record) for record in served_fleet.registry("embed"))}
    took = {key: 0 for key in ("requests", "items", "batches")}
    for old in before:
        new = after[(old["node"], old["proc"])]
        for key in took:
            took[key] += new[key] - old[key]
    assert took["items"] == len(TEXTS)
    assert took["requests"] <= len(TEXTS) / 4, f"{took['requests']} requests carried {len(TEXTS)} single items"
    assert took["items"] / took["batches"] >= 4, took
    assert stats["calls"] == len(TEXTS) and stats["requests"] == took["requests"]


def test_hooks_run_in_the_caller_and_order_is_kept(served_fleet, reference) -> None:
    threads_seen: list[tuple[str, int]] = []

    def preprocess(record: dict) -> str:  # the server could not read a dict: this must run here
        threads_seen.append(("pre", threading.get_ident()))
        return record["text"]

    def postprocess(vector: np.ndarray) -> float:
        threads_seen.append(("post", threading.get_ident()))
        return float(np.linalg.norm(vector))

    texts = TEXTS[:16]
    expected = [float(np.linalg.norm(reference[t])) for t in texts]
    with fleet.connect(served_fleet.fleet.spec_path) as f:
        embed = f.serving("embed", preprocess=preprocess, postprocess=postprocess)
        assert embed.batched_run([{"text": t} for t in texts[:3]]) == pytest.approx(expected[:3], abs=1e-4)
        assert {ident for _, ident in threads_seen} == {threading.get_ident()}
        assert [kind for kind, _ in threads_seen] == ["pre"] * 3 + ["post"] * 3
        streamed = list(embed.map(({"text": t} for t in texts), concurrency=8))
    assert streamed == pytest.approx(expected, abs=1e-4)


def test_a_deadline_is_a_clear_error_without_hanging(served_fleet) -> None:
    with fleet.connect(served_fleet.fleet.spec_path) as f:
        slow = f.serving("slow", timeout=0.5)
        started = time.monotonic()
        with pytest.raises(ServingTimeout, match="deadline"):
            slow.batched_run([b"x"] * 8)  # two batches of 4 x 0.4 s on one server
        assert time.monotonic() - started < 3
        assert slow.batched_run(b"quick", timeout=30) == hashlib.sha256(b"quick").hexdigest()


def test_a_drained_server_finishes_what_it_holds(served_fleet) -> None:
    w1, w2 = served_fleet.fleet.worker(1), served_fleet.fleet.worker(2)
    record = next(r for r in served_fleet.registry("slow") if r["node"] == w1)
    items = [f"drain {i}".encode() for i in range(8)]
    wait_for(lambda: _health(served_fleet, record)["held"] == 0, 20, f"the server on {w1} to finish earlier work")
    accepted = _health(served_fleet, record)["requests"]
    with fleet.connect(served_fleet.fleet.spec_path) as f, ThreadPoolExecutor(8) as pool:
        slow = f.serving("slow", timeout=60)
        futures = [pool.submit(slow.batched_run, item) for item in items]
        wait_for(lambda: (h := _health(served_fleet, record))["requests"] > accepted and h["held"] > 0, 20,
                 f"requests held by the server on {w1}")
        _terminate(served_fleet, record)
        results = [future.result(timeout=60) for future in futures]
        assert results == [hashlib.sha256(item).hexdigest() for item in items]
        stats = slow.stats()
        assert stats["resent"] == 0, "a held request was lost and sent again"
        assert stats["answered_by"].get(w1, 0) >= 1
        wait_for(lambda: not any(r["node"] == w1 for r in served_fleet.registry("slow")), 20,
                 f"the server on {w1} to leave the registry")
        log = served_fleet.log("slow", w1)
        assert "draining: accepting nothing new, finishing" in log and "drained after" in log
        assert "finishing 0 item(s)" not in log
        before = slow.stats()["answered_by"].get(w2, 0)
        more = [f"after {i}".encode() for i in range(4)]
        assert slow.batched_run(more) == [hashlib.sha256(item).hexdigest() for item in more]
        assert slow.stats()["answered_by"].get(w2, 0) == before + 1


def test_jobs_logs_report_and_cancel_work_on_a_serving(served_fleet) -> None:
    lf = served_fleet.fleet
    jobs = {job["name"]: job["status"] for job in json.loads(lf.cli("jobs", "--json", check=True).stdout)}
    assert jobs == {"embed": "serving", "slow": "serving"}
    logs = lf.cli("logs", "embed", check=True).stdout
    assert f"{lf.worker(2)} | fleet-serve: {lf.worker(2)} proc 0: serving text-embed" in logs
    report = json.loads(lf.cli("report", "embed", "--json", check=True).stdout)
    assert report, "an empty report"
    assert lf.worker(1) in json.dumps(report) and lf.worker(2) in json.dumps(report)
    lf.cli("cancel", "slow", check=True)
    wait_for(lambda: not served_fleet.registry("slow"), 30, "the slow servers to stop")
    assert not [cmd for cmd in node_processes_matching(lf.name, "fleet.worker.serve", lf.root) if "/jobs/slow" in cmd]
    with fleet.connect(lf.spec_path) as f, pytest.raises(ServingTimeout, match="no server of 'slow'"):
        f.serving("slow", timeout=2).batched_run(b"x")


def test_a_server_that_cannot_start_is_a_clear_error(served_fleet) -> None:
    lf = served_fleet.fleet
    job = lf.write_job({"name": "broken", "env": lf.plugin_env(),
                        "serve": {"handler": "no_such_module:factory"}})
    started = time.monotonic()
    result = lf.cli("serve", str(job), timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the server of broken failed on" in result.stderr and "fleet logs broken" in result.stderr
    assert "Traceback" not in result.stderr and time.monotonic() - started < 60
    assert "cannot import no_such_module" in lf.cli("logs", "broken", check=True).stdout


def test_a_worker_preempted_under_load_loses_nothing(served_fleet, reference) -> None:
    victim, replacement = served_fleet.fleet.worker(1), served_fleet.fleet.worker(1, 2)
    stop = threading.Event()
    lock = threading.Lock()
    calls = [0]
    answers: list[tuple[str, np.ndarray]] = []
    failures: list[BaseException] = []
    with fleet.connect(served_fleet.fleet.spec_path) as f:
        embed = f.serving("embed", timeout=120)

        def caller(k: int) -> None:
            i = k
            while not stop.is_set():
                text = TEXTS[i % len(TEXTS)]
                i += 64
                with lock:
                    calls[0] += 1
                try:
                    vector = embed.batched_run(text)
                except BaseException as exc:  # noqa: BLE001 - reported below
                    failures.append(exc)
                    return
                with lock:
                    answers.append((text, vector))

        threads = [threading.Thread(target=caller, args=(k,)) for k in range(64)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: embed.stats()["answered_by"].get(victim, 0) > 3, 60, f"load on {victim}")
            served_fleet.fleet.cli("preempt", victim, check=True)
            wait_for(lambda: embed.stats()["answered_by"].get(replacement, 0) > 0, 180,
                     f"the replacement {replacement} to serve")
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=180)
        stats = embed.stats()
    assert not failures, failures[:3]
    assert not any(t.is_alive() for t in threads)
    assert len(answers) == calls[0], "a call was answered twice or not at all"
    assert stats["calls"] == calls[0]
    assert stats["resent"] >= 1, "no request was in flight on the preempted worker"
    for text, vector in answers:
        np.testing.assert_allclose(vector, reference[text], atol=1e-4)


def test_a_dead_fleet_is_a_clear_error_without_hanging(served_fleet) -> None:
    from serve_fleet import _stop

    with fleet.connect(served_fleet.fleet.spec_path) as f:
        embed = f.serving("embed", timeout=5)
        _stop(served_fleet.process)
        served_fleet.fleet.down()
        started = time.monotonic()
        with pytest.raises(ServingError) as caught:
            embed.batched_run("anyone there?")
        assert time.monotonic() - started < 15
        assert "not running" in str(caught.value) or "no server" in str(caught.value)
        with pytest.raises(ServingError):
            f.serving("embed")
