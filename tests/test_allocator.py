"""The cluster allocator: the search for free clusters starts past the used ones (so an
allocation costs the same whatever the image size), and freed clusters are reused first.
Placement is judged by ``qemu-img map``; every image ends ``qemu-img check`` clean."""

from __future__ import annotations

from qemutools import assert_check_clean, create, map_json

import qcowfs

CS = 64 << 10


def _host_of(image, guest: int) -> int:
    for ext in map_json(image):
        if ext["start"] <= guest < ext["start"] + ext["length"] and ext["data"]:
            return ext["offset"] + guest - ext["start"]
    raise AssertionError(f"guest offset {guest} is not allocated")


def test_search_starts_past_the_used_clusters(tmp_path):
    image = create(tmp_path / "img.qcow2", "64M")
    disk = qcowfs.open_image(str(image), writable=True)
    try:
        for k in range(0, 200, 2):  # one allocation per write
            disk.write(k * CS, b"\x5a" * 4096)
        refs = disk.writer.refs
        assert refs.free_hint == refs.end_of_used(), \
            "the next allocation would rescan clusters that are all in use"
    finally:
        disk.close()
    assert_check_clean(image)


def test_freed_cluster_is_reused_before_the_file_grows(tmp_path):
    image = create(tmp_path / "img.qcow2", "64M")
    disk = qcowfs.open_image(str(image), writable=True)
    try:
        for k in range(8):
            disk.write(k * CS, bytes([k + 1]) * CS)
        disk.flush()
    finally:
        disk.close()
    hole = _host_of(image, 3 * CS)
    disk = qcowfs.open_image(str(image), writable=True)
    try:
        disk.discard(3 * CS, CS)
        disk.flush()
        disk.write(40 * CS, b"\x77" * (2 * CS))  # two clusters: do not fit the hole
        disk.write(50 * CS, b"\x66" * CS)  # one cluster: fills it
    finally:
        disk.close()
    assert _host_of(image, 50 * CS) == hole
    assert _host_of(image, 41 * CS) == _host_of(image, 40 * CS) + CS
    assert _host_of(image, 40 * CS) > hole
    assert_check_clean(image)
