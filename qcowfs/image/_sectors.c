/* The sector loop of qcowfs.image.evp, in C: one call per run of 512-byte sectors.
 *
 * For each sector it sets the IV (plain: the 32-bit sector number, plain64: the 64-bit one,
 * both little-endian and zero-padded to the block; essiv: plain64 encrypted by a second, ECB
 * context) and calls OpenSSL's EVP_Cipher on the caller's context. No cipher code here: the
 * contexts, and the addresses of the two EVP functions used, come from the libcrypto that
 * evp.py loaded through cffi, so this file needs neither OpenSSL's headers nor linking with
 * libcrypto. The GIL is released once for the whole run.
 *
 * Optional: setup.py builds it where a compiler is present; without it evp.py keeps its
 * Python loop and crypto.py its array path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef int (*cipher_fn)(void *ctx, unsigned char *out, const unsigned char *in,
                         unsigned int inl);
typedef int (*init_fn)(void *ctx, const void *type, void *impl, const unsigned char *key,
                       const unsigned char *iv, int enc);

static cipher_fn evp_cipher;
static init_fn evp_init;

#define SECTOR 512
#define IV_LEN 16
#define CHUNK 256 /* sectors whose IVs are made (and essiv-encrypted) at once */

enum { IVGEN_PLAIN = 0, IVGEN_PLAIN64 = 1 };

static PyObject *
sectors_bind(PyObject *self, PyObject *args)
{
    PyObject *cipher, *init;
    if (!PyArg_ParseTuple(args, "OO", &cipher, &init))
        return NULL;
    void *c = PyLong_AsVoidPtr(cipher);
    void *i = PyLong_AsVoidPtr(init);
    if (PyErr_Occurred())
        return NULL;
    if (!c || !i) {
        PyErr_SetString(PyExc_ValueError, "null function address");
        return NULL;
    }
    evp_cipher = (cipher_fn)(uintptr_t)c;
    evp_init = (init_fn)(uintptr_t)i;
    Py_RETURN_NONE;
}

static void
put_iv(unsigned char *iv, uint64_t n, int bytes)
{
    memset(iv, 0, IV_LEN);
    for (int k = 0; k < bytes; k++)
        iv[k] = (unsigned char)(n >> (8 * k));
}

/* run(ctx, live_iv, src, dst, sector, count, ivgen, essiv_ctx) -> None
 *
 * ctx: address of an EVP_CIPHER_CTX set up with key and direction (padding off);
 * live_iv: address of its IV (EVP_CIPHER_CTX_iv_noconst), or 0 for one EVP_CipherInit_ex
 * with the IV per sector; src, dst: buffers of at least count sectors (may be the same);
 * sector: the first sector's number (taken modulo 2^64); ivgen: 0 plain, 1 plain64;
 * essiv_ctx: address of an ECB encryption context for essiv, or 0. */
static PyObject *
sectors_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "run() takes 8 arguments");
        return NULL;
    }
    void *ctx = PyLong_AsVoidPtr(args[0]);
    unsigned char *live = PyLong_AsVoidPtr(args[1]);
    uint64_t sector = PyLong_AsUnsignedLongLongMask(args[4]);
    Py_ssize_t count = PyLong_AsSsize_t(args[5]);
    long ivgen = PyLong_AsLong(args[6]);
    void *essiv = PyLong_AsVoidPtr(args[7]);
    if (PyErr_Occurred())
        return NULL;
    if (!ctx || count < 0 || (ivgen != IVGEN_PLAIN && ivgen != IVGEN_PLAIN64)) {
        PyErr_SetString(PyExc_ValueError, "bad context, count or IV generator");
        return NULL;
    }
    if (!evp_cipher || !evp_init) {
        PyErr_SetString(PyExc_RuntimeError, "bind() was not called");
        return NULL;
    }
    Py_buffer src, dst;
    if (PyObject_GetBuffer(args[2], &src, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[3], &dst, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    if (count > PY_SSIZE_T_MAX / SECTOR || src.len < count * SECTOR
        || dst.len < count * SECTOR) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "buffers shorter than the sectors");
        return NULL;
    }
    const unsigned char *in = src.buf;
    unsigned char *out = dst.buf;
    int bytes = ivgen == IVGEN_PLAIN ? 4 : 8;
    int failed = 0;

    Py_BEGIN_ALLOW_THREADS
    unsigned char ivs[CHUNK * IV_LEN];
    for (Py_ssize_t done = 0; done < count && !failed; done += CHUNK) {
        Py_ssize_t n = count - done < CHUNK ? count - done : CHUNK;
        for (Py_ssize_t k = 0; k < n; k++)
            put_iv(ivs + k * IV_LEN, sector + (uint64_t)(done + k), bytes);
        if (essiv)
            failed |= evp_cipher(essiv, ivs, ivs, (unsigned int)(n * IV_LEN)) <= 0;
        for (Py_ssize_t k = 0; k < n; k++) {
            Py_ssize_t at = (done + k) * SECTOR;
            if (live)
                memcpy(live, ivs + k * IV_LEN, IV_LEN);
            else
                failed |= evp_init(ctx, NULL, NULL, NULL, ivs + k * IV_LEN, -1) != 1;
            failed |= evp_cipher(ctx, out + at, in + at, SECTOR) <= 0;
        }
    }
    Py_END_ALLOW_THREADS

    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (failed) {
        PyErr_SetString(PyExc_OSError, "libcrypto failed a sector");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef sectors_methods[] = {
    {"bind", sectors_bind, METH_VARARGS,
     "bind(EVP_Cipher address, EVP_CipherInit_ex address): the functions run() calls."},
    {"run", (PyCFunction)(void (*)(void))sectors_run, METH_FASTCALL,
     "run(ctx, live_iv, src, dst, sector, count, ivgen, essiv_ctx): count sectors."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef sectors_module = {
    PyModuleDef_HEAD_INIT, "_sectors",
    "One C loop over a run of sectors calling libcrypto's EVP (see evp.py).", -1,
    sectors_methods,
};

PyMODINIT_FUNC
PyInit__sectors(void)
{
    return PyModule_Create(&sectors_module);
}
