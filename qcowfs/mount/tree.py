"""The mounted tree: names, nodes, inode numbers and attributes, independent of FUSE.

    /                        ino 1
    /disk                    ino 2   the guest disk (read/write unless mounted ro)
    /snapshots               ino 3
    /snapshots/<dir>         one directory per internal snapshot (inodes from 16 up)
    /snapshots/<dir>/disk    the snapshot's disk, read-only
    /snapshots/<dir>/info    its metadata, ``key: value`` lines
    /layers                  ino 4
    /layers/<depth>-<file>   one directory per image of the backing chain, top first (depth 0)
    /layers/<dir>/disk       that image over everything below it, read-only
    /layers/<dir>/info       its path, format, virtual size, backing file and depth

Snapshot directory names (:func:`snapshot_dir_names`): a snapshot appears under its own name
when that name is a usable file name (not empty, not ``.`` or ``..``, no ``/`` or NUL, at most
255 bytes) that no other snapshot shares. Any other snapshot appears as ``<name>~<id>`` with
``/`` and NUL replaced by ``_`` (an empty name gives ``~<id>``); if even that is taken, ``~<id>``
is appended again until it is unique. Inode numbers of a snapshot stay the same as long as the
snapshot exists and are never reused while the mount lives.

Layer directory names (:func:`layer_dir_names`): the depth in decimal, ``-``, and the image's
file name (the last part of its path), cut at the end to fit 255 bytes. The depth makes every
name unique even when two layers share a file name. The chain cannot change while it is mounted
(its images are locked), so layer inodes are fixed at mount time.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass
from enum import Enum

from qcowfs.chain.disk import SnapshotInfo

ROOT_INO = 1
DISK_INO = 2
SNAPSHOTS_INO = 3
LAYERS_INO = 4
FIRST_DYNAMIC_INO = 16

DISK_NAME = "disk"
SNAPSHOTS_NAME = "snapshots"
LAYERS_NAME = "layers"
INFO_NAME = "info"
NAME_MAX = 255


class FsError(Exception):
    """A request the tree refuses, with the errno the caller gets."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(message or os.strerror(code))
        self.errno = code


class Kind(Enum):
    ROOT = "root"
    DISK = "disk"
    SNAPSHOTS = "snapshots"
    SNAP_DIR = "snapshot dir"
    SNAP_DISK = "snapshot disk"
    SNAP_INFO = "snapshot info"
    LAYERS = "layers"
    LAYER_DIR = "layer dir"
    LAYER_DISK = "layer disk"
    LAYER_INFO = "layer info"


@dataclass(slots=True)
class Node:
    ino: int
    kind: Kind
    snap_id: str | None = None
    depth: int | None = None


@dataclass(slots=True)
class Attr:
    """What stat(2) shows for a node (the adapter copies it into EntryAttributes)."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass(slots=True)
class SnapshotNodes:
    info: SnapshotInfo
    dir: Node
    disk: Node
    meta: Node
    meta_text: bytes


@dataclass(slots=True)
class LayerNodes:
    name: str
    dir: Node
    disk: Node
    meta: Node


def usable_name(name: str) -> bool:
    """True when ``name`` can be a directory entry as it is."""
    return (name not in ("", ".", "..") and "/" not in name and "\0" not in name
            and len(os.fsencode(name)) <= NAME_MAX)


def _clip(name: str, tail: str) -> str:
    """``name + tail`` cut so that it fits in NAME_MAX bytes (never cutting the tail)."""
    room = NAME_MAX - len(os.fsencode(tail))
    raw = os.fsencode(name)[:max(0, room)]
    return raw.decode("utf-8", "ignore") + tail


def snapshot_dir_names(snapshots: list[SnapshotInfo]) -> dict[str, SnapshotInfo]:
    """The directory name of every snapshot (rule in the module docstring), in table order."""
    counts: dict[str, int] = {}
    for s in snapshots:
        counts[s.name] = counts.get(s.name, 0) + 1
    taken: dict[str, SnapshotInfo] = {}
    fallback: list[SnapshotInfo] = []
    for s in snapshots:
        if usable_name(s.name) and counts[s.name] == 1:
            taken[s.name] = s
        else:
            fallback.append(s)
    for s in fallback:
        base = s.name.replace("/", "_").replace("\0", "_")
        suffix = f"~{s.id}"
        name = _clip(base, suffix)
        while name in taken or name in (".", ".."):
            suffix += f"~{s.id}"
            name = _clip(base, suffix)
        taken[name] = s
    order = {s.id: i for i, s in enumerate(snapshots)}
    return dict(sorted(taken.items(), key=lambda kv: order[kv[1].id]))


def layer_dir_names(paths: list[str]) -> list[str]:
    """The directory name of each chain image, top first (rule in the module docstring)."""
    names = []
    for depth, path in enumerate(paths):
        prefix = os.fsencode(f"{depth}-")
        base = os.fsencode(os.path.basename(path.rstrip("/")) or path)
        names.append((prefix + base[:NAME_MAX - len(prefix)]).decode("utf-8", "ignore"))
    return names


def layer_info_text(layer, depth: int) -> bytes:
    """A chain image's metadata file: one ``key: value`` per line (empty when not set)."""
    header = getattr(layer, "header", None)
    fmt = getattr(layer, "format", "raw")
    size = layer.active.size if header is not None else layer.size
    lines = [
        f"path: {os.path.abspath(layer.path)}",
        f"format: {fmt}",
        f"virtual_size: {size}",
        f"backing_file: {(header.backing_file or '') if header is not None else ''}",
        f"backing_format: {(header.backing_format or '') if header is not None else ''}",
        f"depth: {depth}",
    ]
    return ("\n".join(lines) + "\n").encode()


def info_text(s: SnapshotInfo) -> bytes:
    """The snapshot's metadata file: one ``key: value`` per line."""
    lines = [
        f"id: {s.id}",
        f"name: {s.name}",
        f"date: {s.date.isoformat()}",
        f"date_sec: {s.date_sec}",
        f"date_nsec: {s.date_nsec}",
        f"vm_clock_ns: {s.vm_clock}",
        f"vm_clock: {_clock(s.vm_clock)}",
        f"disk_size: {s.size}",
        f"vm_state_size: {s.vm_state_size}",
        f"icount: {'' if s.icount is None else s.icount}",
    ]
    return ("\n".join(lines) + "\n").encode()


def _clock(ns: int) -> str:
    secs, frac = divmod(ns, 1_000_000_000)
    h, rest = divmod(secs, 3600)
    m, s = divmod(rest, 60)
    return f"{h:02d}:{m:02d}:{s:02d}.{frac // 1_000_000:03d}"


class Tree:
    """Names to nodes to attributes over an open disk. ``disk`` is the engine's Disk."""

    def __init__(self, disk, image_path: str, *, read_only: bool, uid: int, gid: int,
                 umask: int):
        self.disk = disk
        self.image_path = image_path
        self.read_only = read_only
        self.uid = uid
        self.gid = gid
        self.umask = umask
        now = time.time_ns()
        self.mount_ns = now
        try:
            st = os.stat(image_path)
            self.disk_mtime_ns = st.st_mtime_ns
            self.disk_ctime_ns = st.st_ctime_ns
        except OSError:
            self.disk_mtime_ns = self.disk_ctime_ns = now
        # What `du disk` counts: the top image (and its data file). Kept as O_PATH descriptors
        # opened before the mount, so that stat never walks a path that may lie under the
        # mount itself (an image inside its own mount point would deadlock the daemon).
        paths = [image_path]
        data_file = getattr(getattr(getattr(disk, "top", None), "data_file", None), "path", None)
        if data_file and os.path.abspath(data_file) != image_path:
            paths.append(os.path.abspath(data_file))
        self.host_fds: list[int] = []
        for path in paths:
            try:
                self.host_fds.append(os.open(path, os.O_PATH | os.O_CLOEXEC))
            except OSError:
                pass
        self.root = Node(ROOT_INO, Kind.ROOT)
        self.disk_node = Node(DISK_INO, Kind.DISK)
        self.snapshots_node = Node(SNAPSHOTS_INO, Kind.SNAPSHOTS)
        self.layers_node = Node(LAYERS_INO, Kind.LAYERS)
        self.nodes: dict[int, Node] = {n.ino: n for n in
                                       (self.root, self.disk_node, self.snapshots_node,
                                        self.layers_node)}
        self._next_ino = FIRST_DYNAMIC_INO
        chain = getattr(disk, "layers", [])
        self.layers: list[LayerNodes] = []
        for depth, name in enumerate(layer_dir_names([layer.path for layer in chain])):
            nodes = LayerNodes(name, *(Node(self._new_ino(), kind, depth=depth) for kind in
                                       (Kind.LAYER_DIR, Kind.LAYER_DISK, Kind.LAYER_INFO)))
            self.layers.append(nodes)
            for n in (nodes.dir, nodes.disk, nodes.meta):
                self.nodes[n.ino] = n
        self.layer_names = {nodes.name: nodes for nodes in self.layers}
        self.snaps: dict[str, SnapshotNodes] = {}  # by snapshot id
        self.snap_names: dict[str, str] = {}  # directory name -> snapshot id
        self.refresh_snapshots()

    # --- snapshots ------------------------------------------------------------------------

    def _new_ino(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def refresh_snapshots(self) -> list[str]:
        """Rebuild the snapshot names from the image's table. Returns the directory names that
        went away or now lead elsewhere (the kernel must forget them)."""
        infos = self.disk.snapshots
        names = snapshot_dir_names(infos)
        old_names = self.snap_names
        live = {s.id for s in infos}
        for sid in list(self.snaps):
            if sid not in live:
                gone = self.snaps.pop(sid)
                for n in (gone.dir, gone.disk, gone.meta):
                    self.nodes.pop(n.ino, None)
        for s in infos:
            nodes = self.snaps.get(s.id)
            if nodes is None or nodes.info != s:
                if nodes is None:
                    nodes = SnapshotNodes(s, Node(self._new_ino(), Kind.SNAP_DIR, s.id),
                                          Node(self._new_ino(), Kind.SNAP_DISK, s.id),
                                          Node(self._new_ino(), Kind.SNAP_INFO, s.id),
                                          info_text(s))
                    self.snaps[s.id] = nodes
                    for n in (nodes.dir, nodes.disk, nodes.meta):
                        self.nodes[n.ino] = n
                else:
                    nodes.info = s
                    nodes.meta_text = info_text(s)
        self.snap_names = {name: s.id for name, s in names.items()}
        return [name for name, sid in old_names.items() if self.snap_names.get(name) != sid]

    def snapshot_by_dir_name(self, name: str) -> SnapshotNodes:
        sid = self.snap_names.get(name)
        if sid is None:
            raise FsError(errno.ENOENT)
        return self.snaps[sid]

    def dir_name_of(self, snap_id: str) -> str:
        for name, sid in self.snap_names.items():
            if sid == snap_id:
                return name
        raise FsError(errno.ENOENT)

    def layer_text(self, depth: int) -> bytes:
        """The ``info`` file of a layer, made when asked (the top's size can change)."""
        return layer_info_text(self.disk.layers[depth], depth)

    # --- names ----------------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise FsError(errno.ENOENT) from None

    def lookup(self, parent_ino: int, name: str) -> Node:
        parent = self.node(parent_ino)
        kind = parent.kind
        if name == ".":
            return parent
        if kind is Kind.ROOT:
            if name == "..":
                return parent
            if name == DISK_NAME:
                return self.disk_node
            if name == SNAPSHOTS_NAME:
                return self.snapshots_node
            if name == LAYERS_NAME:
                return self.layers_node
        elif kind is Kind.LAYERS:
            if name == "..":
                return self.root
            if name in self.layer_names:
                return self.layer_names[name].dir
        elif kind is Kind.LAYER_DIR:
            if name == "..":
                return self.layers_node
            nodes = self.layers[parent.depth]
            if name == DISK_NAME:
                return nodes.disk
            if name == INFO_NAME:
                return nodes.meta
        elif kind is Kind.SNAPSHOTS:
            if name == "..":
                return self.root
            return self.snapshot_by_dir_name(name).dir
        elif kind is Kind.SNAP_DIR:
            if name == "..":
                return self.snapshots_node
            nodes = self.snaps[parent.snap_id]
            if name == DISK_NAME:
                return nodes.disk
            if name == INFO_NAME:
                return nodes.meta
        else:
            raise FsError(errno.ENOTDIR)
        raise FsError(errno.ENOENT)

    def listdir(self, ino: int) -> list[tuple[str, Node]]:
        """The entries of a directory, without ``.`` and ``..``."""
        node = self.node(ino)
        if node.kind is Kind.ROOT:
            return [(DISK_NAME, self.disk_node), (SNAPSHOTS_NAME, self.snapshots_node),
                    (LAYERS_NAME, self.layers_node)]
        if node.kind is Kind.LAYERS:
            return [(nodes.name, nodes.dir) for nodes in self.layers]
        if node.kind is Kind.LAYER_DIR:
            nodes = self.layers[node.depth]
            return [(DISK_NAME, nodes.disk), (INFO_NAME, nodes.meta)]
        if node.kind is Kind.SNAPSHOTS:
            return [(name, self.snaps[sid].dir) for name, sid in self.snap_names.items()]
        if node.kind is Kind.SNAP_DIR:
            nodes = self.snaps[node.snap_id]
            return [(DISK_NAME, nodes.disk), (INFO_NAME, nodes.meta)]
        raise FsError(errno.ENOTDIR)

    # --- attributes -----------------------------------------------------------------------

    def touch_disk(self) -> None:
        """The disk was written: its mtime and ctime move."""
        self.disk_mtime_ns = self.disk_ctime_ns = time.time_ns()

    def attr(self, node: Node) -> Attr:
        kind = node.kind
        umask = self.umask
        if kind is Kind.DISK:
            mode = stat.S_IFREG | ((0o444 if self.read_only else 0o666) & ~umask)
            blocks = 0
            for fd in self.host_fds:
                try:
                    blocks += os.fstat(fd).st_blocks
                except OSError:
                    pass
            return Attr(node.ino, mode, 1, self.uid, self.gid, self.disk.size, blocks,
                        self.disk_mtime_ns, self.disk_mtime_ns, self.disk_ctime_ns)
        if kind is Kind.ROOT:
            return self._dir(node, 0o555, 4)
        if kind is Kind.SNAPSHOTS:
            return self._dir(node, 0o555 if self.read_only else 0o777, 2 + len(self.snaps))
        if kind is Kind.LAYERS:
            return self._dir(node, 0o555, 2 + len(self.layers))
        if kind is Kind.LAYER_DIR:
            return self._dir(node, 0o555, 2)
        if kind is Kind.LAYER_DISK:
            t = self.disk_mtime_ns if node.depth == 0 else self.mount_ns
            return Attr(node.ino, stat.S_IFREG | (0o444 & ~umask), 1, self.uid, self.gid,
                        self.disk.layer_size(node.depth), 0, t, t, t)
        if kind is Kind.LAYER_INFO:
            text = self.layer_text(node.depth)
            return Attr(node.ino, stat.S_IFREG | (0o444 & ~umask), 1, self.uid, self.gid,
                        len(text), 0, self.mount_ns, self.mount_ns, self.mount_ns)
        nodes = self.snaps.get(node.snap_id)
        if nodes is None:
            raise FsError(errno.ENOENT)
        info = nodes.info
        t = info.date_sec * 1_000_000_000 + info.date_nsec
        if kind is Kind.SNAP_DIR:
            mode = stat.S_IFDIR | (0o555 & ~umask)
            return Attr(node.ino, mode, 2, self.uid, self.gid, 0, 0, t, t, t)
        if kind is Kind.SNAP_DISK:
            return Attr(node.ino, stat.S_IFREG | (0o444 & ~umask), 1, self.uid, self.gid,
                        info.size, 0, t, t, t)
        return Attr(node.ino, stat.S_IFREG | (0o444 & ~umask), 1, self.uid, self.gid,
                    len(nodes.meta_text), 0, t, t, t)

    def host_statvfs(self) -> os.statvfs_result:
        """The file system that holds the image."""
        if self.host_fds:
            return os.fstatvfs(self.host_fds[0])
        return os.statvfs(os.path.dirname(self.image_path) or "/")

    def close(self) -> None:
        for fd in self.host_fds:
            os.close(fd)
        self.host_fds = []

    def _dir(self, node: Node, perm: int, nlink: int) -> Attr:
        mode = stat.S_IFDIR | (perm & ~self.umask)
        t = self.mount_ns
        return Attr(node.ino, mode, nlink, self.uid, self.gid, 0, 0, t, t, t)
