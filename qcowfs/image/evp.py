"""Sector runs through the system's OpenSSL ``libcrypto`` (EVP, cffi in ABI mode): an optional
accelerator of :mod:`qcowfs.image.crypto`, no cipher code of our own.

Each 512-byte sector is one ``EVP_Cipher`` call on a long-lived per-thread context whose IV is
rewritten in place between calls (through the pointer ``EVP_CIPHER_CTX_iv_noconst`` gives;
where that is not the live IV, one ``EVP_CipherInit_ex`` with the IV per sector instead).

The loop over the sectors runs in C when the optional extension ``qcowfs.image._sectors`` was
built (:meth:`EvpSectors.sectors`): one call per run, the IVs made in C, the GIL released once
for the whole run, some 0.4 µs a sector of which the AES is most. It is handed the contexts
and the two EVP functions' addresses from here, so it needs neither OpenSSL's headers nor
linking with libcrypto. Without it (not built, or ``QCOWFS_NO_SECTOR_LOOP`` set) the loop is
Python's (:meth:`EvpSectors.run`, about 1 µs a sector, the GIL dropped at every call), used
for small runs only. Whether a context really gives the array path's bytes is checked once
per key (:class:`crypto.SectorCipher`); anything missing (no cffi, no libcrypto 3, a cipher
OpenSSL lacks, a refused key) leaves the array path alone in charge.
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
_looped = None

#: the C loop's IV generators (qcowfs/image/_sectors.c)
IVGENS = {"plain": 0, "plain64": 1, "essiv": 1}


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


def _loop():
    """The C sector loop (``qcowfs.image._sectors``) bound to libcrypto's functions, or None
    when it was not built, libcrypto is missing, or the environment sets
    ``QCOWFS_NO_SECTOR_LOOP`` (for comparisons and tests of the fallback)."""
    global _looped
    if _looped is None:
        loaded = _library()
        _looped = False
        if loaded is not None and not os.environ.get("QCOWFS_NO_SECTOR_LOOP"):
            try:
                from qcowfs.image import _sectors
            except ImportError:
                pass
            else:
                ffi, lib = loaded
                _sectors.bind(int(ffi.cast("uintptr_t", lib.EVP_Cipher)),
                              int(ffi.cast("uintptr_t", lib.EVP_CipherInit_ex)))
                _looped = _sectors
    return _looped or None


class EvpSectors:
    """One OpenSSL cipher (``"aes-256-xts"``, ``"aes-128-cbc"``...) and key. :meth:`run`
    does whole sectors with the IV blocks given; contexts are per thread."""

    def __init__(self, name: str, key: bytes, iv_width: int, ivgen: str | None = None,
                 essiv_key: bytes | None = None):
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
        self._ivgen = IVGENS.get(ivgen or "", -1)
        self._essiv_cipher = None
        if essiv_key is not None:
            self._essiv_cipher = self._lib.EVP_get_cipherbyname(
                f"aes-{len(essiv_key) * 8}-ecb".encode())
            if self._essiv_cipher == self._ffi.NULL:
                raise OSError("libcrypto has no ECB cipher for essiv")
        self._essiv_key = essiv_key
        #: the C loop (:meth:`sectors`) when it is built and the IV generator is one it makes
        self.loop = _loop() if self._ivgen >= 0 and iv_width == 16 else None
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
        essiv = self._local.__dict__.get("essiv")
        if essiv is None and self._essiv_key is not None:
            essiv = ffi.gc(lib.EVP_CIPHER_CTX_new(), lib.EVP_CIPHER_CTX_free)
            if essiv == ffi.NULL or lib.EVP_CipherInit_ex(essiv, self._essiv_cipher, ffi.NULL,
                                                          self._essiv_key, ffi.NULL, 1) != 1:
                raise OSError("libcrypto refused the essiv key")
            lib.EVP_CIPHER_CTX_set_padding(essiv, 0)
            self._local.essiv = essiv
        address = int(ffi.cast("uintptr_t", ctx))
        live_address = int(ffi.cast("uintptr_t", live))
        essiv_address = int(ffi.cast("uintptr_t", essiv)) if essiv is not None else 0
        state = (ctx, iv, address, live_address, essiv_address)
        setattr(self._local, "enc" if enc else "dec", state)
        return state

    def sectors(self, src, dst, sector: int, count: int, enc: bool) -> None:
        """``count`` sectors of ``src`` into ``dst`` (both at least that long; they may be
        the same buffer), the first with sector number ``sector``, in one call of the C loop
        (:attr:`loop` must be set), which makes the IVs itself."""
        state = getattr(self._local, "enc" if enc else "dec", None)
        if state is None:
            state = self._contexts(enc)
        live = state[3] if self.live_iv else 0
        self.loop.run(state[2], live, src, dst, sector, count, self._ivgen, state[4])

    def run(self, src, dst, ivs: bytes, count: int, enc: bool) -> None:
        """``count`` sectors of ``src`` into ``dst`` (both at least that long; they may be
        the same buffer), sector ``k`` with the IV ``ivs[k * width:(k + 1) * width]``."""
        state = getattr(self._local, "enc" if enc else "dec", None)
        if state is None:
            state = self._contexts(enc)
        ctx, iv = state[0], state[1]
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
