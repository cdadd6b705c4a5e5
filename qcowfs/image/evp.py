"""Sector runs through the system's OpenSSL ``libcrypto`` (EVP, cffi in ABI mode): an optional
accelerator of :mod:`qcowfs.image.crypto` for small requests, no cipher code of our own.

Each 512-byte sector is one ``EVP_Cipher`` call on a long-lived context whose IV is rewritten
in place between calls (through the pointer ``EVP_CIPHER_CTX_iv_noconst`` gives; where that is
not the live IV, one ``EVP_CipherInit_ex`` with the IV per sector instead). That is about
0.5 µs a sector, against some 30 numpy and ``cryptography`` calls a request for the array
path, and every call runs without the GIL (cffi releases it), so a data thread can decrypt
while the request loop runs. Whether a context really gives the array path's bytes is checked
once per key (:class:`crypto.SectorCipher`); anything missing (no cffi, no libcrypto 3, a
cipher OpenSSL lacks, a refused key) leaves the array path alone in charge.
"""

from __future__ import annotations

import os
import threading

_CDEF = """
void *EVP_CIPHER_CTX_new(void);
void EVP_CIPHER_CTX_free(void *ctx);
const void *EVP_get_cipherbyname(const char *name);
int EVP_CipherInit_ex(void *ctx, const void *type, void *impl, const unsigned char *key,
                      const unsigned char *iv, int enc);
int EVP_CIPHER_CTX_set_padding(void *ctx, int pad);
int EVP_Cipher(void *ctx, unsigned char *out, const unsigned char *in, unsigned int inl);
unsigned char *EVP_CIPHER_CTX_iv_noconst(void *ctx);
"""

_SECTOR = 512
_loaded = None


def _library():
    """``(ffi, lib)`` of libcrypto 3, or None when cffi or the library is missing (or the
    environment sets ``QCOWFS_NO_LIBCRYPTO``, for comparisons and as a way out)."""
    global _loaded
    if _loaded is None:
        if os.environ.get("QCOWFS_NO_LIBCRYPTO"):
            _loaded = False
            return None
        try:
            import cffi
            ffi = cffi.FFI()
            ffi.cdef(_CDEF)
            _loaded = (ffi, ffi.dlopen("libcrypto.so.3"))
        except (ImportError, OSError, AttributeError):
            _loaded = False
    return _loaded or None


class EvpSectors:
    """One OpenSSL cipher (``"aes-256-xts"``, ``"aes-128-cbc"``...) and key. :meth:`run`
    does whole sectors with the IV blocks given; contexts are per thread."""

    def __init__(self, name: str, key: bytes, iv_width: int):
        loaded = _library()
        if loaded is None:
            raise OSError("libcrypto 3 is not available through cffi")
        self._ffi, self._lib = loaded
        self._cipher = self._lib.EVP_get_cipherbyname(name.encode())
        if self._cipher == self._ffi.NULL:
            raise OSError(f"libcrypto has no {name}")
        self._key = key
        self._width = iv_width
        self._local = threading.local()
        #: whether writing through ``EVP_CIPHER_CTX_iv_noconst`` sets the IV (checked by
        #: the caller against known bytes; else one EVP_CipherInit_ex per sector)
        self.live_iv = True
        self._contexts(True)
        self._contexts(False)  # refusals (an XTS key with equal halves) show here

    def _contexts(self, enc: bool):
        ffi, lib = self._ffi, self._lib
        ctx = ffi.gc(lib.EVP_CIPHER_CTX_new(), lib.EVP_CIPHER_CTX_free)
        if ctx == ffi.NULL or lib.EVP_CipherInit_ex(ctx, self._cipher, ffi.NULL, self._key,
                                                    bytes(self._width), int(enc)) != 1:
            raise OSError("libcrypto refused the key")
        lib.EVP_CIPHER_CTX_set_padding(ctx, 0)
        live = lib.EVP_CIPHER_CTX_iv_noconst(ctx)
        iv = ffi.buffer(live, self._width) if live != ffi.NULL else None
        state = (ctx, iv)
        setattr(self._local, "enc" if enc else "dec", state)
        return state

    def run(self, src, dst, ivs: bytes, count: int, enc: bool) -> None:
        """``count`` sectors of ``src`` into ``dst`` (both at least that long; they may be
        the same buffer), sector ``k`` with the IV ``ivs[k * width:(k + 1) * width]``."""
        state = getattr(self._local, "enc" if enc else "dec", None)
        if state is None:
            state = self._contexts(enc)
        ctx, iv = state
        ffi, cipher = self._ffi, self._lib.EVP_Cipher
        s = ffi.from_buffer(src)
        d = ffi.from_buffer(dst, require_writable=True)
        w = self._width
        failed = 0
        if iv is not None and self.live_iv:
            for k in range(count):
                iv[:] = ivs[k * w:k * w + w]
                at = k * _SECTOR
                failed |= cipher(ctx, d + at, s + at, _SECTOR) <= 0
        else:
            init, null = self._lib.EVP_CipherInit_ex, ffi.NULL
            for k in range(count):
                at = k * _SECTOR
                failed |= init(ctx, null, null, null, ivs[k * w:k * w + w], -1) != 1
                failed |= cipher(ctx, d + at, s + at, _SECTOR) <= 0
        if failed:
            raise OSError("libcrypto failed a sector")
