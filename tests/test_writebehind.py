"""The write-behind thread of convert's outputs: writes run in order, at most ``depth`` are
queued, and a failure is raised by a later ``submit`` or by ``drain``, as inline."""

from __future__ import annotations

import threading

import pytest

from qcowfs.image.writebehind import WriteBehind


def test_writes_run_in_submission_order():
    done: list[int] = []
    with WriteBehind() as io:
        for i in range(50):
            io.submit(done.append, i)
        io.drain()
    assert done == list(range(50))


def test_at_most_depth_writes_wait():
    gate = threading.Event()
    queued = threading.Event()
    io = WriteBehind(depth=2)
    try:
        io.submit(gate.wait)
        io.submit(lambda: None)
        blocked = threading.Thread(target=lambda: (io.submit(lambda: None), queued.set()))
        blocked.start()
        assert not queued.wait(0.2), "a third write was queued past depth 2"
        gate.set()
        assert queued.wait(10)
        blocked.join(10)
        io.drain()
    finally:
        gate.set()
        io.close()


def test_a_failure_is_raised_by_drain():
    def fail():
        raise OSError(28, "No space left on device")

    with WriteBehind() as io:
        io.submit(fail)
        with pytest.raises(OSError, match="No space"):
            io.drain()
