"""The fast request loop (qcowfs.mount.requestloop): its lock does not yield when free, and the
daemon still hears signals while requests never stop arriving."""

from __future__ import annotations

import os
import random
import signal
import threading

import pyfuse3
import pytest
import trio
from mounttools import is_mounted, mounted, needs_fuse, wait_until
from qemutools import assert_check_clean, create, qemu_io

from qcowfs.mount import requestloop


async def _note_running(ran: list) -> None:
    ran.append(True)


async def test_free_fast_lock_is_taken_without_yielding():
    ran: list = []
    lock = requestloop.FastLock()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_note_running, ran)
        async with lock:
            assert not ran, "acquiring a free FastLock let another task run"
        await trio.sleep(0)
    assert ran


async def test_held_fast_lock_makes_others_wait():
    lock = requestloop.FastLock()
    order = []

    async def second():
        async with lock:
            order.append("second")

    async with trio.open_nursery() as nursery:
        await lock.acquire()
        nursery.start_soon(second)
        await trio.sleep(0.01)
        order.append("first")
        assert lock.locked()
        lock.release()
    assert order == ["first", "second"]


async def test_fast_wait_readable_returns_for_a_readable_fd_and_waits_otherwise():
    low = requestloop.FastTrio().lowlevel
    r, w = os.pipe()
    try:
        with trio.move_on_after(0.2) as scope:
            await low.wait_readable(r)
        assert scope.cancelled_caught, "returned for an fd with nothing to read"
        os.write(w, b"x")
        with trio.fail_after(5):
            for _ in range(3 * requestloop.YIELD_EVERY):
                await low.wait_readable(r)
    finally:
        os.close(r)
        os.close(w)


async def test_fast_wait_readable_lets_other_tasks_run_under_sustained_load():
    low = requestloop.FastTrio().lowlevel
    turns = 0

    async def other_task():
        nonlocal turns
        while True:
            turns += 1
            await trio.sleep(0)

    r, w = os.pipe()
    try:
        os.write(w, b"x")  # readable for good: the fast path is always open
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)
            await trio.sleep(0)
            before = turns
            for _ in range(640):
                await low.wait_readable(r)
            assert turns - before >= 640 // 64, "other tasks starve while requests keep coming"
            nursery.cancel_scope.cancel()
    finally:
        os.close(r)
        os.close(w)


async def test_a_request_within_the_poll_window_skips_the_sleep(monkeypatch):
    slept = []

    async def sleeping_wait(fd):
        slept.append(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", sleeping_wait)
    r, w = os.pipe()
    try:
        low = requestloop.FastTrio(poll_ns=5_000_000_000).lowlevel
        timer = threading.Timer(0.05, os.write, (w, b"x"))
        timer.start()
        await low.wait_readable(r)
        timer.join()
        assert not slept, "slept in epoll although the request came inside the poll window"
        os.read(r, 1)
        await requestloop.FastTrio(poll_ns=0).lowlevel.wait_readable(r)
        assert slept == [r], "without a poll window an empty fd must wait through trio"
    finally:
        os.close(r)
        os.close(w)


def test_install_swaps_the_trio_pyfuse3_uses():
    try:
        requestloop.install(50)
        assert requestloop.installed()
        assert pyfuse3.trio.Lock is requestloop.FastLock
        assert pyfuse3.trio.open_nursery is trio.open_nursery
    finally:
        requestloop.uninstall()
    assert pyfuse3.trio is trio


@needs_fuse
@pytest.mark.fuse
def test_sigterm_unmounts_while_requests_keep_coming(tmp_path):
    """Under sustained load the fd is always readable; the loop must still let the signal
    task run, unmount and close the image cleanly."""
    image = create(tmp_path / "img.qcow2", "64M")
    qemu_io(image, "write -P 0x3c 0 64M")
    stop = threading.Event()
    served = [0] * 6

    def hammer(i: int, path: str) -> None:
        rng = random.Random(i)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return
        try:
            while not stop.is_set():
                off = rng.randrange(0, 64 << 20, 4096)
                if i % 2:
                    os.pwrite(fd, b"\x3c" * 4096, off)
                else:
                    os.pread(fd, 4096, off)
                served[i] += 1
        except OSError:
            pass  # the mount went away under us: expected
        finally:
            try:
                os.close(fd)
            except OSError:
                pass

    with mounted(image, tmp_path / "mnt") as mp:
        pid = int(os.getxattr(mp, "user.qcowfs.pid"))
        threads = [threading.Thread(target=hammer, args=(i, str(mp / "disk")), daemon=True)
                   for i in range(len(served))]
        try:
            for t in threads:
                t.start()
            wait_until(lambda: sum(served) > 2000, what="the load to build up")
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not is_mounted(mp), timeout=60,
                       what="the daemon to unmount under load")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), what="the daemon to exit")
    assert_check_clean(image)
