"""The node's core lease (engine/core_lease.py): prefill and decode forwards never overlap, prefill goes
first, a waiter sleeps instead of spinning, and a holder that dies frees the node."""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import threading
import time

from engine.core_lease import LeaseRole, NodeCoreLease, lease_key


def _wait_until(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def _turnstile_taken(lease: NodeCoreLease) -> bool:
    fd = os.open(lease.paths[0], os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_forwards_of_the_two_roles_never_overlap(tmp_path):
    leases = [NodeCoreLease("k", role, tmp_path) for role in (LeaseRole.PREFILL, LeaseRole.DECODE)]
    inside, overlaps = [0], []

    def work(lease: NodeCoreLease) -> None:
        for _ in range(50):
            with lease.hold():
                inside[0] += 1
                overlaps.append(inside[0] > 1)
                time.sleep(0.0005)
                inside[0] -= 1

    threads = [threading.Thread(target=work, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(overlaps) == 100 and not any(overlaps)
    assert [lease.turns for lease in leases] == [50, 50]


def test_prefill_goes_before_a_decode_step_that_asks_again(tmp_path):
    prefill, decode = NodeCoreLease("k", LeaseRole.PREFILL, tmp_path), NodeCoreLease("k", LeaseRole.DECODE, tmp_path)
    order: list[str] = []

    def take(lease: NodeCoreLease, name: str) -> None:
        with lease.hold():
            order.append(name)

    with decode.hold():  # a decode step is running
        waiting = threading.Thread(target=take, args=(prefill, "prefill"))
        waiting.start()
        _wait_until(lambda: _turnstile_taken(prefill))  # prefill queued for the cores
    take(decode, "decode")  # the decode loop's next step: behind the waiting prefill
    waiting.join()
    assert order == ["prefill", "decode"]
    assert prefill.waited_s > 0


def test_a_waiter_sleeps_instead_of_spinning(tmp_path):
    prefill, decode = NodeCoreLease("k", LeaseRole.PREFILL, tmp_path), NodeCoreLease("k", LeaseRole.DECODE, tmp_path)
    cpu = []

    def wait_for_cores() -> None:
        started = time.thread_time()
        with decode.hold():
            cpu.append(time.thread_time() - started)

    with prefill.hold():
        waiter = threading.Thread(target=wait_for_cores)
        waiter.start()
        time.sleep(0.5)
    waiter.join()
    assert decode.waited_s >= 0.4
    assert cpu[0] < 0.1 * decode.waited_s  # blocked in the kernel, not burning the core it waits for


def test_leases_of_other_runs_or_nodes_are_independent(tmp_path):
    assert lease_key("run-a", "node-1") != lease_key("run-a", "node-2") != lease_key("run-b", "node-1")
    mine = NodeCoreLease(lease_key("run-a", "node-1"), LeaseRole.PREFILL, tmp_path)
    other = NodeCoreLease(lease_key("run-b", "node-1"), LeaseRole.DECODE, tmp_path)
    with mine.hold(), other.hold():
        pass
    assert other.turns == 1


def _hold_forever(directory, ready) -> None:
    lease = NodeCoreLease("k", LeaseRole.PREFILL, directory)
    with lease.hold():
        ready.set()
        time.sleep(600)


def test_a_holder_that_dies_frees_the_node(tmp_path):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=_hold_forever, args=(tmp_path, ready))
    child.start()
    try:
        assert ready.wait(60)
        child.kill()
        child.join(10)
        decode = NodeCoreLease("k", LeaseRole.DECODE, tmp_path)
        with decode.hold():
            pass
        assert decode.turns == 1
    finally:
        if child.is_alive():
            child.kill()
