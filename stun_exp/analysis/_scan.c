/* One read of a weight for the post-run analysis: power sums, zero counts and packed zero bits.

Why native: torch and numpy take about ten array operations per chunk for the same figures (a
product, four reductions, a comparison, a packing, a count), each one a pass over the chunk; here
every entry is read once. The summation order is fixed by this code, not by the compiler or the
CPU: eight interleaved float32 lanes within blocks of BLOCK entries, added into float64 in lane
order at the end of each block. The AVX2 path (x86-64 CPUs that have it, checked at import; about
1.3x the SSE2 path's speed on one thread), the SSE2 path (every x86-64 CPU) and the plain C path
(other CPUs) perform the same operations in the same order, and the build turns off fused
multiply-adds (-ffp-contract=off), so the sums are the same on every machine and for any thread count.

scan(src, kind, chunk, sums, zeros, bits[, portable])
    src    the weight's entries, C-contiguous (kind 0: float32, kind 1: bfloat16 as 16-bit words)
    chunk  entries per chunk, a positive multiple of 8
    sums   float64 buffer, 4 per chunk: sum x, sum x^2, sum x^3, sum x^4
    zeros  int64 buffer, 1 per chunk: entries equal to 0 (-0.0 included, as x == 0 counts them)
    bits   uint8 buffer of ceil(n / 8) bytes for the zero pattern, first entry in the most
           significant bit (numpy.packbits' order), or None
    portable  optional, true: the SSE2 / plain C path even where AVX2 is used (tests compare them)
The GIL is released while it reads. ``simd`` names the path the CPU gets ("avx2" or "portable").
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 2048   /* 256 float32 terms per lane before a float64 addition */

typedef struct { double s[4]; int64_t zeros; } Acc;

static uint8_t reversed[256];   /* a byte's bits in reverse order: movemask's LSB-first -> packbits' MSB-first */

static void init_reversed(void) {
    for (int i = 0; i < 256; i++) {
        int r = 0;
        for (int k = 0; k < 8; k++)
            if (i & (1 << k)) r |= 1 << (7 - k);
        reversed[i] = (uint8_t)r;
    }
}

/* The lanes' sums added into acc in lane order, in float64. */
static void add_lanes(Acc *acc, const float lanes[4][8], const int32_t zeros[8]) {
    for (int p = 0; p < 4; p++)
        for (int k = 0; k < 8; k++) acc->s[p] += lanes[p][k];
    for (int k = 0; k < 8; k++) acc->zeros += zeros[k];
}

/* Entries past the last full group of 8: their own float32 sums, then the last (partial) byte. */
static void add_tail(const float *x, int64_t n, Acc *acc, uint8_t *bits) {
    float t[4] = {0, 0, 0, 0};
    uint8_t last = 0;
    for (int64_t i = 0; i < n; i++) {
        float v = x[i], v2 = v * v;
        t[0] += v; t[1] += v2; t[2] += v2 * v; t[3] += v2 * v2;
        acc->zeros += v == 0.0f;
        last |= (uint8_t)((v == 0.0f) << (7 - i));
    }
    for (int p = 0; p < 4; p++) acc->s[p] += t[p];
    if (bits && n) *bits = last;
}

#if defined(__SSE2__)
#include <emmintrin.h>

/* Sums, zero count and zero bits of x[0:n] (n <= BLOCK): eight lanes as two SSE registers. */
static void scan_block(const float *x, int64_t n, Acc *acc, uint8_t *bits) {
    __m128 zero = _mm_setzero_ps(), s[4][2];
    __m128i z[2] = {_mm_setzero_si128(), _mm_setzero_si128()};
    for (int p = 0; p < 4; p++) s[p][0] = s[p][1] = zero;
    int64_t full = n - n % 8;
    for (int64_t i = 0; i < full; i += 8) {
        int mask = 0;
        for (int h = 0; h < 2; h++) {
            __m128 v = _mm_loadu_ps(x + i + 4 * h), v2 = _mm_mul_ps(v, v), eq = _mm_cmpeq_ps(v, zero);
            s[0][h] = _mm_add_ps(s[0][h], v);
            s[1][h] = _mm_add_ps(s[1][h], v2);
            s[2][h] = _mm_add_ps(s[2][h], _mm_mul_ps(v2, v));
            s[3][h] = _mm_add_ps(s[3][h], _mm_mul_ps(v2, v2));
            z[h] = _mm_sub_epi32(z[h], _mm_castps_si128(eq));
            mask |= _mm_movemask_ps(eq) << (4 * h);
        }
        if (bits) bits[i / 8] = reversed[mask];
    }
    float lanes[4][8];
    int32_t zeros[8];
    for (int h = 0; h < 2; h++) {
        for (int p = 0; p < 4; p++) _mm_storeu_ps(lanes[p] + 4 * h, s[p][h]);
        _mm_storeu_si128((__m128i *)(zeros + 4 * h), z[h]);
    }
    add_lanes(acc, (const float (*)[8])lanes, zeros);
    add_tail(x + full, n - full, acc, bits ? bits + full / 8 : NULL);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2_PATH 1
#include <immintrin.h>

/* scan_block with the eight lanes in one AVX register: lane k is the SSE path's lane k (entry i+k),
   with the same operations in the same order, so the results are the same bit for bit; half the
   instructions, for CPUs that have AVX2 (checked at import). */
__attribute__((target("avx2")))
static void scan_block_avx2(const float *x, int64_t n, Acc *acc, uint8_t *bits) {
    __m256 zero = _mm256_setzero_ps(), s[4];
    __m256i z = _mm256_setzero_si256();
    for (int p = 0; p < 4; p++) s[p] = zero;
    int64_t full = n - n % 8;
    for (int64_t i = 0; i < full; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i), v2 = _mm256_mul_ps(v, v), eq = _mm256_cmp_ps(v, zero, _CMP_EQ_OQ);
        s[0] = _mm256_add_ps(s[0], v);
        s[1] = _mm256_add_ps(s[1], v2);
        s[2] = _mm256_add_ps(s[2], _mm256_mul_ps(v2, v));
        s[3] = _mm256_add_ps(s[3], _mm256_mul_ps(v2, v2));
        z = _mm256_sub_epi32(z, _mm256_castps_si256(eq));
        if (bits) bits[i / 8] = reversed[_mm256_movemask_ps(eq)];
    }
    float lanes[4][8];
    int32_t zeros[8];
    for (int p = 0; p < 4; p++) _mm256_storeu_ps(lanes[p], s[p]);
    _mm256_storeu_si256((__m256i *)zeros, z);
    add_lanes(acc, (const float (*)[8])lanes, zeros);
    add_tail(x + full, n - full, acc, bits ? bits + full / 8 : NULL);
}
#endif
#else
/* The same eight lanes in plain C (same operations in the same order: the same results). */
static void scan_block(const float *x, int64_t n, Acc *acc, uint8_t *bits) {
    float lanes[4][8] = {{0}};
    int32_t zeros[8] = {0};
    int64_t full = n - n % 8;
    for (int64_t i = 0; i < full; i += 8) {
        int mask = 0;
        for (int k = 0; k < 8; k++) {
            float v = x[i + k], v2 = v * v;
            lanes[0][k] += v; lanes[1][k] += v2; lanes[2][k] += v2 * v; lanes[3][k] += v2 * v2;
            zeros[k] += v == 0.0f;
            mask |= (v == 0.0f) << k;
        }
        if (bits) bits[i / 8] = reversed[mask];
    }
    add_lanes(acc, (const float (*)[8])lanes, zeros);
    add_tail(x + full, n - full, acc, bits ? bits + full / 8 : NULL);
}
#endif

static void widen_bf16(const uint16_t *h, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)h[i] << 16;
        memcpy(out + i, &u, sizeof u);
    }
}

typedef void (*BlockFn)(const float *, int64_t, Acc *, uint8_t *);

static int have_avx2 = 0;      /* set at import */

static void scan_entries(const void *src, int kind, int64_t n, int64_t chunk, double *sums, int64_t *zeros,
                         uint8_t *bits, BlockFn scan_block_fn) {
    float wide[BLOCK];
    for (int64_t c = 0, lo = 0; lo < n; c++, lo += chunk) {
        int64_t hi = lo + chunk < n ? lo + chunk : n;
        Acc acc = {{0, 0, 0, 0}, 0};
        for (int64_t b = lo; b < hi; b += BLOCK) {
            int64_t len = b + BLOCK < hi ? BLOCK : hi - b;
            const float *x = (const float *)src + b;
            if (kind == 1) {
                widen_bf16((const uint16_t *)src + b, len, wide);
                x = wide;
            }
            scan_block_fn(x, len, &acc, bits ? bits + b / 8 : NULL);
        }
        memcpy(sums + 4 * c, acc.s, sizeof acc.s);
        zeros[c] = acc.zeros;
    }
}

static PyObject *scan(PyObject *self, PyObject *args) {
    Py_buffer src, sums, zeros, bits = {0};
    int kind, portable = 0;
    Py_ssize_t chunk;
    PyObject *bits_obj, *result = NULL;
    if (!PyArg_ParseTuple(args, "y*inw*w*O|p", &src, &kind, &chunk, &sums, &zeros, &bits_obj, &portable))
        return NULL;
    BlockFn block = scan_block;
#ifdef HAVE_AVX2_PATH
    if (have_avx2 && !portable) block = scan_block_avx2;
#endif
    Py_ssize_t item = kind == 0 ? 4 : 2;
    Py_ssize_t n = src.len / item, chunks = chunk > 0 ? (n + chunk - 1) / chunk : 0;
    int has_bits = bits_obj != Py_None;
    if (has_bits && PyObject_GetBuffer(bits_obj, &bits, PyBUF_WRITABLE) < 0) goto done;
    if ((kind != 0 && kind != 1) || chunk <= 0 || chunk % 8 || src.len % item) {
        PyErr_SetString(PyExc_ValueError, "scan: kind must be 0 or 1 and chunk a positive multiple of 8");
    } else if (sums.len < chunks * 4 * (Py_ssize_t)sizeof(double) || zeros.len < chunks * (Py_ssize_t)sizeof(int64_t)
               || (has_bits && bits.len < (n + 7) / 8)) {
        PyErr_SetString(PyExc_ValueError, "scan: an output buffer is too small");
    } else {
        Py_BEGIN_ALLOW_THREADS
        scan_entries(src.buf, kind, n, chunk, (double *)sums.buf, (int64_t *)zeros.buf,
                     has_bits ? (uint8_t *)bits.buf : NULL, block);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    if (has_bits) PyBuffer_Release(&bits);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&sums);
    PyBuffer_Release(&zeros);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS, "Power sums, zero counts and packed zero bits of a weight, per chunk."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scan", NULL, -1, methods};

PyMODINIT_FUNC PyInit__scan(void) {
    init_reversed();
#ifdef HAVE_AVX2_PATH
    __builtin_cpu_init();
    have_avx2 = __builtin_cpu_supports("avx2");
#endif
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddStringConstant(m, "simd", have_avx2 ? "avx2" : "portable") < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
