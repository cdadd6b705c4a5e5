"""The exceptions qcowfs raises for anything wrong with an image.

Every problem with an image is an :class:`ImageError` whose message names the file and what is
wrong, so that the CLI can print one line and the mount can answer EIO and log it. The module
sits below every layer: any of them may raise these.
"""

from __future__ import annotations

import errno as _errno


class ImageError(Exception):
    """Something is wrong with an image, its chain, or the host file under it.

    ``path`` names the file, ``reason`` says what is wrong, ``errno`` is the errno the mount
    answers with (EIO unless a more precise one applies, e.g. ENOSPC or EROFS).
    """

    default_errno = _errno.EIO

    def __init__(self, path: str | None, reason: str, *, errno: int | None = None):
        self.path = path
        self.reason = reason
        self.errno = errno if errno is not None else self.default_errno
        super().__init__(f"{path}: {reason}" if path else reason)


class FormatError(ImageError):
    """The image violates the qcow2 format (bad header, bad table entry, bad pointer...)."""


class UnsupportedError(ImageError):
    """The image is valid but uses something qcowfs does not handle (unknown features,
    LUKS2, ciphers the crypto library lacks)."""

    default_errno = _errno.EOPNOTSUPP


class KeyRequiredError(ImageError):
    """The image is encrypted and no key was given for it."""

    default_errno = _errno.EACCES


class InvalidKeyError(ImageError):
    """The key given for an encrypted image opens none of its key slots."""

    default_errno = _errno.EACCES


class BackingChainError(ImageError):
    """A backing file is missing, unreadable, loops back, or the chain is too deep."""


class ReadOnlyError(ImageError):
    """A write was asked of an image (or view) opened read-only."""

    default_errno = _errno.EROFS


class LockedError(ImageError):
    """Another process (QEMU or qcowfs) holds the image in a way that conflicts."""

    default_errno = _errno.EBUSY


class CorruptionError(FormatError):
    """qcowfs found the image corrupt while writing and stopped (the corrupt bit may be set)."""


class HostIOError(ImageError):
    """The host file system failed (EIO, ENOSPC...); ``errno`` carries the host's errno."""

    @classmethod
    def from_oserror(cls, path: str | None, exc: OSError, what: str) -> HostIOError:
        code = exc.errno if exc.errno else _errno.EIO
        return cls(path, f"{what}: {exc.strerror or exc}", errno=code)
