/* Gather 16-bit float rows (float16, or bfloat16 bits) from a table into float32 rows, in one pass.

   Why C: numpy and torch gather only within one dtype, and numpy casts float16 one value at a time, so in
   Python a decoding gather is two passes (a 16-bit gather, then a cast), each a call per run of rows; this is
   one read of each stored row and one write of its float32 row (NOTE [16-bit gather kernel] in precision.py).
   Optional: the package falls back to those two passes where this module was not built.

   gather(table, width, indices, out, bfloat16, portable=False)
     table    C-contiguous buffer of rows of `width` 16-bit values (read-only is fine; any alignment)
     indices  C-contiguous int64 buffer; each must be in [0, rows), else IndexError naming its position
     out      writable C-contiguous buffer of len(indices) * width float32 values
     portable use the plain C decode even where the CPU has F16C (tests compare the two)
   The GIL is released while rows are copied. `vectorised`: 1 where gather uses the CPU's vector instructions. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_F16C_PATH 1
#include <immintrin.h>
#endif

#define PREFETCH_ROWS 4
#ifndef __GNUC__
#define __builtin_prefetch(...) ((void)0)
#endif

/* float16 bits to float32 bits, exactly as F16C's vcvtph2ps: a signalling NaN is quieted, its payload kept. */
static inline uint32_t half_to_float_bits(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0);
    if (exp == 0) {
        if (man == 0) return sign;
        uint32_t biased = 113; /* a subnormal: shift its leading one into the implicit bit */
        do {
            man <<= 1;
            biased--;
        } while (!(man & 0x400u));
        return sign | (biased << 23) | ((man & 0x3ffu) << 13);
    }
    return sign | ((exp + 112) << 23) | (man << 13);
}

static void row_portable(const unsigned char *src, uint32_t *dst, Py_ssize_t width, int bfloat16) {
    for (Py_ssize_t j = 0; j < width; j++) {
        uint16_t v;
        memcpy(&v, src + 2 * j, 2);
        dst[j] = bfloat16 ? (uint32_t)v << 16 : half_to_float_bits(v);
    }
}

#ifdef HAVE_F16C_PATH
__attribute__((target("avx2,f16c"))) static void row_x86(const unsigned char *src, uint32_t *dst, Py_ssize_t width,
                                                        int bfloat16) {
    Py_ssize_t j = 0;
    for (; j + 8 <= width; j += 8) {
        __m128i v = _mm_loadu_si128((const __m128i *)(src + 2 * j));
        __m256i bits = bfloat16 ? _mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)
                                : _mm256_castps_si256(_mm256_cvtph_ps(v));
        _mm256_storeu_si256((__m256i *)(dst + j), bits);
    }
    row_portable(src + 2 * j, dst + j, width - j, bfloat16);
}
#endif

static PyObject *gather(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"table", "width", "indices", "out", "bfloat16", "portable", NULL};
    Py_buffer table, indices, out;
    Py_ssize_t width;
    int bfloat16, portable = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*ny*w*p|p", keywords, &table, &width, &indices, &out,
                                     &bfloat16, &portable))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t row_bytes = 2 * width, n = indices.len / (Py_ssize_t)sizeof(int64_t);
    if (width <= 0 || table.len % row_bytes || indices.len % (Py_ssize_t)sizeof(int64_t) ||
        out.len != n * width * 4) {
        PyErr_Format(PyExc_ValueError,
                     "gather: table of %zd bytes, rows of %zd values, %zd indices and an out of %zd bytes do not fit",
                     table.len, width, n, out.len);
        goto done;
    }
    Py_ssize_t rows = table.len / row_bytes, bad = -1;
    const int64_t *idx = (const int64_t *)indices.buf;
    const unsigned char *src = (const unsigned char *)table.buf;
    uint32_t *dst = (uint32_t *)out.buf;
    void (*row)(const unsigned char *, uint32_t *, Py_ssize_t, int) = row_portable;
#ifdef HAVE_F16C_PATH
    if (!portable && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) row = row_x86;
#endif
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t r, next;
        memcpy(&r, idx + i, sizeof r);
        if (r < 0 || r >= rows) {
            bad = i;
            break;
        }
        /* Ask for the stored row and the batch row a few ahead (the latter to write): random rows beyond the
           caches are waits on memory, and the decode's own loads and stores leave the core too few of them in
           flight. 6144 random rows of 768 from 600,000: 3.8 -> 2.9 ms; into a batch not in the core's cache
           (diag_decode.py --batches 3): 1.25x -> 1.05x float32's np.take. */
        if (i + PREFETCH_ROWS < n && (memcpy(&next, idx + i + PREFETCH_ROWS, sizeof next), next >= 0 && next < rows)) {
            const char *ahead = (const char *)(dst + (i + PREFETCH_ROWS) * width);
            for (Py_ssize_t b = 0; b < row_bytes; b += 64) {
                __builtin_prefetch(src + next * row_bytes + b);
                __builtin_prefetch(ahead + 2 * b, 1);
                __builtin_prefetch(ahead + 2 * b + 64, 1);
            }
        }
        row(src + r * row_bytes, dst + i * width, width, bfloat16);
    }
    Py_END_ALLOW_THREADS
    if (bad >= 0) {
        PyErr_Format(PyExc_IndexError, "gather: index %lld at position %zd is out of range [0, %zd)",
                     (long long)idx[bad], bad, rows);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&table);
    PyBuffer_Release(&indices);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"gather", (PyCFunction)(void (*)(void))gather, METH_VARARGS | METH_KEYWORDS,
     "gather(table, width, indices, out, bfloat16, portable=False): 16-bit rows decoded into float32 rows."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_decode16", NULL, 0, methods};

PyMODINIT_FUNC PyInit__decode16(void) {
    PyObject *m = PyModule_Create(&module);
    int vectorised = 0;
#ifdef HAVE_F16C_PATH
    vectorised = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#endif
    /* 1 where gather runs the CPU's vector instructions; elsewhere it runs the plain C decode, unmeasured
       against the two passes in Python, which the package then keeps */
    if (m != NULL && PyModule_AddIntConstant(m, "vectorised", vectorised) < 0) Py_CLEAR(m);
    return m;
}
