/*
 * qlab CPU kernels: quantized matmul that never builds the float weight. Called from
 * qlab/kernels/cpu.py (ctypes), which also lays the weights out; kernels/README.md has the details.
 *
 *     affine:    W[n,k] = s[n,k/g] * (u[n,k] - z[n,k/g])          (u: b-bit codes, g: group size)
 *     codebook:  W[n,k] = s[n,k/g] * T[u[n,k]]                    (b = 4, T: 16 values, NF4/FP4)
 *     fp8:       W[n,k] = s[n] * e4m3(w[n,k])
 *
 * Decode (few rows of x, memory-bound):
 *   qlab_gemv_i8    affine and codebook codes in the "rows16" layout; x split into two int8 planes
 *                   (one for W8A8), code x activation products summed exactly in int32 (vpdpbusd).
 *   qlab_gemv       "blocks" layout, for layers with rows not in blocks of 16: codes looked up as
 *                   bf16 and multiplied with bf16 x (vdpbf16ps), fp32 sums.
 *   qlab_fp8_gemv   e4m3 bytes widened to bf16 in registers, vdpbf16ps.
 * Prefill (many rows, compute-bound):
 *   qlab_dequant_bf16, qlab_fp8_dequant_bf16
 *                   a block of rows of W in bf16, into a buffer small enough to stay in cache; the
 *                   caller multiplies it with torch's bf16 GEMM (oneDNN, AMX where the CPU has it)
 *                   and moves on to the next block.
 *
 * With AVX-512 (-march=native defines __AVX512F__, __AVX512VNNI__, __AVX512BF16__) the loops use
 * intrinsics; the portable branches do the same arithmetic lane by lane and are what other CPUs
 * run (the tests build both and compare). Threads: OpenMP over output rows.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define QLAB_CPU_ABI 6

int qlab_cpu_abi(void) { return QLAB_CPU_ABI; }

static inline float bf16_to_float(uint16_t h)
{
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round-to-nearest-even fp32 -> bf16 of a finite float (the scaled codes always are). */
static inline uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

int qlab_cpu_avx512(void)
{
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------------------------------------
 * Decode with bf16 dot products, "blocks" layout: each row of K codes of b bits (b in 2, 4, 8;
 * c = 8/b codes per byte) is cut into blocks of B = 16c inputs stored in 16 bytes, byte l of a block
 * holding the codes of inputs blk*B + 16*i + l (i = 0..c-1) in bits [i*b, (i+1)*b). Widening 16
 * bytes gives vectors of 16 consecutive inputs, so x and the output are read and written
 * contiguously (llama.cpp's Q4_0 is laid out that way for the same reason). The zero-point leaves
 * the loop:  y[m,n] = sum_g s_g * (x_g . u_g) - (s_g z_g) * sum(x_g).  The prefill tiles read the
 * same layout.
 * ------------------------------------------------------------------------------------------- */
/* MB rows of x at once against one row of W: out[m] = sum_g s_g * (x[m]_g . v_g), v = lut[code]
 * (the code itself, or a codebook's value). Each block of 16 bytes is decoded once for all MB rows.
 * Always inlined with constant BITS and MB, so every variant is straight-line code. */
#define QLAB_INLINE static inline __attribute__((always_inline))
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define QLAB_BF16_DOT 1
/* 2- and 4-bit codes: each 16-byte block is widened to 16-bit lanes, the codes of two slots side
 * by side (32 consecutive inputs), mapped to bf16 by a 32-entry lookup (the code's own value, or
 * the codebook's), and multiplied with bf16 x by vdpbf16ps, 32 products per instruction into fp32
 * lanes. 8-bit codes (one slot per byte) are widened to fp32 and use plain FMAs. */
QLAB_INLINE void row_dot(const uint8_t *w, const void *xv, long K, const float *s, long G, long bpg,
                         const int BITS, const __m512i lut, const int MB, float *out)
{
    __m512 acc[4], p[4][2];
    for (int m = 0; m < MB; m++) acc[m] = _mm512_setzero_ps();
    if (BITS == 8) {
        const float *x = (const float *)xv;
        for (long q = 0; q < G; q++) {
            for (int m = 0; m < MB; m++) p[m][0] = p[m][1] = _mm512_setzero_ps();
            for (long blk = 0; blk < bpg; blk++) {
                const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)w)));
                w += 16;
                for (int m = 0; m < MB; m++)
                    p[m][0] = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + m * K), p[m][0]);
                x += 16;
            }
            const __m512 sq = _mm512_set1_ps(s[q]);
            for (int m = 0; m < MB; m++) acc[m] = _mm512_fmadd_ps(p[m][0], sq, acc[m]);
        }
    } else {
        const uint16_t *x = (const uint16_t *)xv;
        const int c = 8 / BITS;
        const __m512i mask = _mm512_set1_epi16((1 << BITS) - 1);
        /* word lanes 0-15 take slot i of each byte, lanes 16-31 slot i+1 */
        const __m512i sh0 = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(BITS), 1);
        const __m512i sh1 = _mm512_add_epi16(sh0, _mm512_set1_epi16(2 * BITS));
        for (long q = 0; q < G; q++) {
            for (int m = 0; m < MB; m++) p[m][0] = p[m][1] = _mm512_setzero_ps();
            for (long blk = 0; blk < bpg; blk++) {
                const __m128i bytes = _mm_loadu_si128((const __m128i *)w);
                const __m512i wide = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(bytes));
                w += 16;
                for (int h = 0; h < c / 2; h++) {
                    const __m512i u = _mm512_and_si512(_mm512_srlv_epi16(wide, h ? sh1 : sh0), mask);
                    const __m512bh v = (__m512bh)_mm512_permutexvar_epi16(u, lut);
                    for (int m = 0; m < MB; m++)
                        p[m][h] = _mm512_dpbf16_ps(p[m][h], v, (__m512bh)_mm512_loadu_si512(x + m * K + 32 * h));
                }
                x += 16 * c;
            }
            const __m512 sq = _mm512_set1_ps(s[q]);
            for (int m = 0; m < MB; m++) acc[m] = _mm512_fmadd_ps(_mm512_add_ps(p[m][0], p[m][1]), sq, acc[m]);
        }
    }
    for (int m = 0; m < MB; m++) out[m] = _mm512_reduce_add_ps(acc[m]);
}
#else
#define QLAB_BF16_DOT 0

/* The same products lane by lane: bf16 x times the bf16 lookup of each code (fp32 x times the
 * code for 8 bits), fp32 sums. */
QLAB_INLINE void row_dot(const uint8_t *w, const void *xv, long K, const float *s, long G, long bpg,
                         const int BITS, const uint16_t *lut, const int MB, float *out)
{
    const int c = 8 / BITS;
    const unsigned mask = (1u << BITS) - 1u;
    float val[256];
    for (int u = 0; u <= (int)mask; u++) val[u] = BITS == 8 ? (float)u : bf16_to_float(lut[u]);
    for (int m = 0; m < MB; m++) out[m] = 0.0f;
    for (long q = 0; q < G; q++) {
        float p[4] = {0};
        for (long blk = 0; blk < bpg; blk++) {
            for (int i = 0; i < c; i++)
                for (int l = 0; l < 16; l++) {
                    const float v = val[(w[l] >> (i * BITS)) & mask];
                    const long k = (q * bpg + blk) * 16 * c + 16 * i + l;
                    for (int m = 0; m < MB; m++)
                        p[m] += v * (BITS == 8 ? ((const float *)xv)[m * K + k]
                                               : bf16_to_float(((const uint16_t *)xv)[m * K + k]));
                }
            w += 16;
        }
        for (int m = 0; m < MB; m++) out[m] += s[q] * p[m];
    }
}
#endif

#if QLAB_BF16_DOT
typedef __m512i lut_t;
#define LOAD_LUT(p) _mm512_loadu_si512(p)
#else
typedef const uint16_t *lut_t;
#define LOAD_LUT(p) (p)
#endif

QLAB_INLINE void gemv_rows(int M, long N, long K, const int BITS, long g, const void *x,
                           const float *xsum, const uint8_t *w, const float *scale, const float *sz,
                           const uint16_t *lut32, float *y, int threads)
{
    const long G = K / g, row_bytes = K * BITS / 8, bpg = g / (16L * (8 / BITS));
    const size_t xbytes = BITS == 8 ? sizeof(float) : sizeof(uint16_t);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long n = 0; n < N; n++) {
        const lut_t lut = LOAD_LUT(lut32);
        const uint8_t *wr = w + n * row_bytes;
        const float *sr = scale + n * G;
        for (int m0 = 0; m0 < M; m0 += 4) {
            const void *xm = (const char *)x + (size_t)m0 * K * xbytes;
            float t[4];
            switch (M - m0) {
            case 1: row_dot(wr, xm, K, sr, G, bpg, BITS, lut, 1, t); break;
            case 2: row_dot(wr, xm, K, sr, G, bpg, BITS, lut, 2, t); break;
            case 3: row_dot(wr, xm, K, sr, G, bpg, BITS, lut, 3, t); break;
            default: row_dot(wr, xm, K, sr, G, bpg, BITS, lut, 4, t); break;
            }
            const int mb = M - m0 < 4 ? M - m0 : 4;
            for (int m = 0; m < mb; m++) {
                float tm = t[m];
                if (sz)
                    for (long q = 0; q < G; q++) tm -= sz[n * G + q] * xsum[(long)(m0 + m) * G + q];
                y[(long)(m0 + m) * N + n] = tm;
            }
        }
    }
}

/* y[M, N] = x[M, K] W^T. x: bf16 (as uint16) for 2- and 4-bit codes, fp32 for 8-bit; w: [N, K*bits/8]
 * kernel blocks; scale, sz: [N, K/g] fp32 with sz = scale*zero (NULL: no zero-point); xsum: [M, K/g]
 * group sums of x (read only with sz); lut: 32 bf16 values, entry u the value of code u (u itself
 * for affine codes, T[u] for a codebook; unused for 8-bit). Returns 0, or -1 when the shapes do
 * not fit the layout. */
int qlab_gemv(int M, long N, long K, int bits, long g, const void *x, const float *xsum,
              const uint8_t *w, const float *scale, const float *sz, const uint16_t *lut, float *y,
              int threads)
{
    if (bits != 2 && bits != 4 && bits != 8) return -1;
    const long B = 16L * (8 / bits);
    if (M < 1 || N < 1 || K < 1 || g < B || K % g || g % B) return -1;
    if (bits == 2)
        gemv_rows(M, N, K, 2, g, x, xsum, w, scale, sz, lut, y, threads);
    else if (bits == 4)
        gemv_rows(M, N, K, 4, g, x, xsum, w, scale, sz, lut, y, threads);
    else
        gemv_rows(M, N, K, 8, g, x, xsum, w, scale, sz, lut, y, threads);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Decode with integer dot products: affine codes times x as two int8 planes.
 *
 * Layout "rows16" (prepare_rows16 in cpu.py): rows in blocks of 16, inputs in chunks of
 * KB = 4c (c = 8/b codes per byte); a chunk of a row block is 64 bytes, 4 per row, and byte t of
 * row j holds, in bits [i*b, (i+1)*b), the code of input k0 + 4i + t. Masking slot i out of all 64
 * bytes gives each 32-bit lane (one row) the codes of 4 consecutive inputs, which vpdpbusd
 * multiplies with 4 int8 x values broadcast to every lane: 64 products an instruction, 16 rows at
 * once, no horizontal sums, and the per-group scales of 16 rows are one vector load.
 *
 * x is split per row into two int8 planes, x = sx (q1 + q2/254) with sx = max|x| / 127,
 * q1 = round(x/sx), q2 = round(254 (x/sx - q1)): every element to within sx/508 (about 15 bits,
 * finer than bf16 for all but the smallest elements). Products sum exactly in int32:
 *     y[m,n] = sx * sum_g s[n,g] * ((A1 + A2/254) - z[n,g] * X[g]),  A = u . q over the group,
 *     X[g] = sum over the group of (q1 + q2/254).
 * ------------------------------------------------------------------------------------------- */
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#define QLAB_VNNI 1
#else
#define QLAB_VNNI 0
#endif

int qlab_cpu_vnni(void) { return QLAB_VNNI; }

/* Two int8 planes of one row of x and the per-group sums X; returns sx (0 for an all-zero row),
 * or NaN when the row holds an inf or a nan (its outputs are then NaN, as in float arithmetic).
 * With planes == 1, q2 = 0: plain per-token int8, q1 = round(x / sx) exactly as W8A8 defines it. */
static float split_x(const float *x, long K, long g, int8_t *q1, int8_t *q2, float *X, int codebook,
                     int planes)
{
    float amax = 0.0f;
    int finite = 1;
    for (long k = 0; k < K; k++) {
        const float a = x[k] < 0 ? -x[k] : x[k];
        finite &= a <= 3.402823466e38f; /* false for inf and nan */
        amax = a > amax ? a : amax;
    }
    if (!finite) {
        memset(q1, 0, (size_t)K);
        memset(q2, 0, (size_t)K);
        for (long q = 0; q < K / g; q++) X[q] = 0.0f;
        return __builtin_nanf("");
    }
    const float sx = amax / 127.0f;
    for (long q = 0; q < K / g; q++) {
        float acc = 0.0f;
        for (long k = q * g; k < (q + 1) * g; k++) {
            float t = sx > 0 ? x[k] / sx : 0.0f; /* a division, as torch's round(x / s) */
            t = t > 127.0f ? 127.0f : t < -127.0f ? -127.0f : t;
            const float r1 = __builtin_nearbyintf(t);
            float r2 = planes == 2 ? __builtin_nearbyintf((t - r1) * 254.0f) : 0.0f;
            r2 = r2 > 127.0f ? 127.0f : r2 < -127.0f ? -127.0f : r2;
            q1[k] = (int8_t)r1;
            q2[k] = (int8_t)r2;
            /* affine: X = sum(q1 + q2/254); codebook: the offset sum (see block_dot_i8) */
            acc += codebook ? r1 + (r1 + r2) * (1.0f / 254.0f) + r2 * (1.0f / (254.0f * 254.0f))
                            : r1 + r2 * (1.0f / 254.0f);
        }
        X[q] = acc;
    }
    return sx;
}

/* Codebooks (4-bit, table T): 127 T[u] = L1[u] + L2[u]/254 to within 1/508, with byte levels stored
 * offset by 128 (vpdpbusd wants unsigned bytes first): l = L + 128. Then, per group,
 *     sum (L1 + L2/254)(q1 + q2/254) = [a1 + a2/254 + a3/254^2] - 128 X,
 *     a1 = l1.q1,  a2 = l1.q2 + l2.q1,  a3 = l2.q2,  X = Q1 + (Q1 + Q2)/254 + Q2/254^2
 * (Q the group sums of q); st then holds s/127 and the zero is the constant 128. */
QLAB_INLINE void block_dot_i8(const uint8_t *w, const int8_t *q1, const int8_t *q2, const float *X,
                              const float *st, const float *zt, const uint8_t *levels, long G, long cpg,
                              const int BITS, const int PLANES, float sx, float *y)
{
#if QLAB_VNNI
    const int c = 8 / BITS;
    const __m512i mask = _mm512_set1_epi8((char)((1 << BITS) - 1));
    __m512i lv1 = _mm512_setzero_si512(), lv2 = _mm512_setzero_si512();
    if (levels) {
        lv1 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)levels));
        lv2 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(levels + 16)));
    }
    __m512 acc = _mm512_setzero_ps();
    for (long q = 0; q < G; q++) {
        __m512i a1 = _mm512_setzero_si512(), a2 = _mm512_setzero_si512();
        __m512i b1 = _mm512_setzero_si512(), b2 = _mm512_setzero_si512();
        for (long ch = 0; ch < cpg; ch++) {
            /* the codes stream from memory once per call: ask for them ~2 KB ahead (measured on a
             * cold cache: 25% faster at 4 and 8 bits; a prefetch past the end is harmless) */
            _mm_prefetch((const char *)(w + 2048), _MM_HINT_T0);
            const __m512i v = _mm512_loadu_si512(w);
            w += 64;
            for (int i = 0; i < c; i++) {
                const __m512i u = BITS == 8 ? v
                                  : i == 0 ? _mm512_and_si512(v, mask)
                                           : _mm512_and_si512(_mm512_srli_epi32(v, i * BITS), mask);
                int32_t x1, x2;
                memcpy(&x1, q1 + 4 * i, 4);
                memcpy(&x2, q2 + 4 * i, 4);
                if (levels) {
                    const __m512i l1 = _mm512_shuffle_epi8(lv1, u), l2 = _mm512_shuffle_epi8(lv2, u);
                    const __m512i x1v = _mm512_set1_epi32(x1);
                    a1 = _mm512_dpbusd_epi32(a1, l1, x1v);
                    a2 = _mm512_dpbusd_epi32(a2, l1, _mm512_set1_epi32(x2));
                    b2 = _mm512_dpbusd_epi32(b2, l2, x1v);
                    b1 = _mm512_dpbusd_epi32(b1, l2, _mm512_set1_epi32(x2));
                } else if (i & 1) {
                    b1 = _mm512_dpbusd_epi32(b1, u, _mm512_set1_epi32(x1));
                    if (PLANES == 2) b2 = _mm512_dpbusd_epi32(b2, u, _mm512_set1_epi32(x2));
                } else {
                    a1 = _mm512_dpbusd_epi32(a1, u, _mm512_set1_epi32(x1));
                    if (PLANES == 2) a2 = _mm512_dpbusd_epi32(a2, u, _mm512_set1_epi32(x2));
                }
            }
            q1 += 4 * c;
            q2 += 4 * c;
        }
        __m512 f;
        if (levels) { /* b1 holds a3 = l2.q2 */
            f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(b1), _mm512_set1_ps(1.0f / (254.0f * 254.0f)), _mm512_cvtepi32_ps(a1));
            f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a2, b2)), _mm512_set1_ps(1.0f / 254.0f), f);
            f = _mm512_sub_ps(f, _mm512_set1_ps(128.0f * X[q]));
        } else {
            a1 = _mm512_add_epi32(a1, b1);
            a2 = _mm512_add_epi32(a2, b2);
            f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a2), _mm512_set1_ps(1.0f / 254.0f), _mm512_cvtepi32_ps(a1));
        }
        if (!levels && zt) f = _mm512_fnmadd_ps(_mm512_loadu_ps(zt + 16 * q), _mm512_set1_ps(X[q]), f);
        acc = _mm512_fmadd_ps(f, _mm512_loadu_ps(st + 16 * q), acc);
    }
    _mm512_storeu_ps(y, _mm512_mul_ps(acc, _mm512_set1_ps(sx)));
#else
    (void)PLANES; /* with one plane q2 is all zeros, so its products add nothing */
    const int c = 8 / BITS;
    const unsigned mask = (1u << BITS) - 1u;
    float acc[16] = {0};
    for (long q = 0; q < G; q++) {
        int32_t a1[16] = {0}, a2[16] = {0}, a3[16] = {0};
        for (long ch = 0; ch < cpg; ch++) {
            for (int j = 0; j < 16; j++)
                for (int t = 0; t < 4; t++) {
                    const unsigned b = w[4 * j + t];
                    for (int i = 0; i < c; i++) {
                        const unsigned u = (b >> (i * BITS)) & mask;
                        if (levels) {
                            a1[j] += levels[u] * q1[4 * i + t];
                            a2[j] += levels[u] * q2[4 * i + t] + levels[16 + u] * q1[4 * i + t];
                            a3[j] += levels[16 + u] * q2[4 * i + t];
                        } else {
                            a1[j] += (int32_t)u * q1[4 * i + t];
                            a2[j] += (int32_t)u * q2[4 * i + t];
                        }
                    }
                }
            w += 64;
            q1 += 4 * c;
            q2 += 4 * c;
        }
        for (int j = 0; j < 16; j++) {
            float f = (float)a1[j] + (float)a3[j] * (1.0f / (254.0f * 254.0f)) + (float)a2[j] * (1.0f / 254.0f);
            if (levels)
                f -= 128.0f * X[q];
            else if (zt)
                f -= zt[16 * q + j] * X[q];
            acc[j] += f * st[16 * q + j];
        }
    }
    for (int j = 0; j < 16; j++) y[j] = acc[j] * sx;
#endif
}

QLAB_INLINE void gemv_i8_rows(int M, long N, long K, const int BITS, const int PLANES, long g,
                              const int8_t *q1, const int8_t *q2, const float *X, const float *sxs,
                              const uint8_t *w, const float *st, const float *zt, const uint8_t *levels,
                              float *y, int threads)
{
    const long G = K / g, KB = 4L * (8 / BITS), cpg = g / KB, block_bytes = 16 * K * BITS / 8;
    float out[16];
#pragma omp parallel for num_threads(threads) schedule(static) private(out)
    for (long nb = 0; nb < N / 16; nb++)
        for (int m = 0; m < M; m++) {
            block_dot_i8(w + nb * block_bytes, q1 + (long)m * K, q2 + (long)m * K, X + (long)m * G,
                         st + nb * G * 16, zt ? zt + nb * G * 16 : 0, levels, G, cpg, BITS, PLANES, sxs[m],
                         out);
            memcpy(y + (long)m * N + nb * 16, out, sizeof out);
        }
}

/* y[M, N] = x[M, K] W^T for codes in the rows16 layout (planes = 2), or W8A8's int8 x int8 product
 * with x quantized per token to one int8 plane (planes = 1, 8-bit codes). x: fp32 [M, K]; st, zt: [N/16, K/g, 16]
 * fp32 scales and zeros (zt NULL: none); levels: NULL for affine codes, or 32 bytes (l1[16], l2[16])
 * for a 4-bit codebook (st = s/127, zt unused); work: 2*M*K bytes + M*(K/g + 1) floats of scratch.
 * Returns 0, or -1 when the shapes do not fit the layout. */
int qlab_gemv_i8(int M, long N, long K, int bits, long g, int planes, const float *x, const uint8_t *w,
                 const float *st, const float *zt, const uint8_t *levels, float *y, void *work,
                 int threads)
{
    if (bits != 2 && bits != 4 && bits != 8) return -1;
    if ((levels && bits != 4) || (planes != 1 && planes != 2) || (planes == 1 && (bits != 8 || levels)))
        return -1;
    const long KB = 4L * (8 / bits);
    if (M < 1 || N < 16 || N % 16 || K < 1 || g < KB || K % g || g % KB) return -1;
    const long G = K / g;
    int8_t *q1 = (int8_t *)work, *q2 = q1 + (long)M * K;
    float *X = (float *)(q2 + (long)M * K), *sxs = X + (long)M * G;
    for (int m = 0; m < M; m++)
        sxs[m] = split_x(x + (long)m * K, K, g, q1 + (long)m * K, q2 + (long)m * K, X + (long)m * G, levels != 0,
                         planes);
    if (bits == 2)
        gemv_i8_rows(M, N, K, 2, 2, g, q1, q2, X, sxs, w, st, zt, 0, y, threads);
    else if (bits == 4)
        gemv_i8_rows(M, N, K, 4, 2, g, q1, q2, X, sxs, w, st, zt, levels, y, threads);
    else if (planes == 2)
        gemv_i8_rows(M, N, K, 8, 2, g, q1, q2, X, sxs, w, st, zt, 0, y, threads);
    else
        gemv_i8_rows(M, N, K, 8, 1, g, q1, q2, X, sxs, w, st, zt, 0, y, threads);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * Prefill: rows of W to bf16, block by block.
 * ------------------------------------------------------------------------------------------- */
#ifdef __AVX512F__
/* Round-to-nearest-even fp32 -> bf16 of 16 finite floats, with AVX-512F integer ops only. */
static inline void store_bf16(uint16_t *o, __m512 v)
{
    __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    _mm256_storeu_si256((__m256i *)o, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}

static void dequant_row(const uint8_t *w, const float *s, const float *z, long G, long blocks_per_g,
                        int bits, const float *table, uint16_t *o)
{
    const int c = 8 / bits;
    const __m512i mask = _mm512_set1_epi32((1 << bits) - 1);
    const __m512 tab = table ? _mm512_loadu_ps(table) : _mm512_setzero_ps();
    for (long q = 0; q < G; q++) {
        const __m512 sv = _mm512_set1_ps(s[q]), zv = _mm512_set1_ps(z ? z[q] : 0.0f);
        for (long blk = 0; blk < blocks_per_g; blk++) {
            const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)w));
            w += 16;
            for (int i = 0; i < c; i++) {
                const __m512i u = _mm512_and_si512(_mm512_srli_epi32(v, i * bits), mask);
                const __m512 f = table ? _mm512_mul_ps(sv, _mm512_permutexvar_ps(u, tab))
                                       : _mm512_mul_ps(sv, _mm512_sub_ps(_mm512_cvtepi32_ps(u), zv));
                store_bf16(o + 16 * i, f);
            }
            o += 16 * c;
        }
    }
}
#else
static void dequant_row(const uint8_t *w, const float *s, const float *z, long G, long blocks_per_g,
                        int bits, const float *table, uint16_t *o)
{
    const int c = 8 / bits;
    const unsigned mask = (1u << bits) - 1u;
    for (long q = 0; q < G; q++) {
        const float zq = z ? z[q] : 0.0f;
        for (long blk = 0; blk < blocks_per_g; blk++) {
            for (int i = 0; i < c; i++)
                for (int l = 0; l < 16; l++) {
                    const unsigned u = (w[l] >> (i * bits)) & mask;
                    o[16 * i + l] = to_bf16(table ? s[q] * table[u] : s[q] * ((float)u - zq));
                }
            w += 16;
            o += 16 * c;
        }
    }
}
#endif

/* out[n1 - n0, K] = bf16(W[n0:n1]) (scale and zero as for qlab_gemv, but the zero itself, not
 * scale*zero; NULL: none). Returns 0, or -1 when the shapes do not fit the layout. */
int qlab_dequant_bf16(long n0, long n1, long K, int bits, long g, const uint8_t *w,
                      const float *scale, const float *zero, const float *table, uint16_t *out,
                      int threads)
{
    if (bits != 2 && bits != 4 && bits != 8) return -1;
    const long B = 16L * (8 / bits);
    if (n0 < 0 || n1 <= n0 || K < 1 || g < B || K % g || g % B || (table && bits != 4)) return -1;
    const long G = K / g, row_bytes = K * bits / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long n = n0; n < n1; n++)
        dequant_row(w + n * row_bytes, scale + n * G, zero ? zero + n * G : 0, G, g / B, bits, table,
                    out + (n - n0) * K);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * FP8 e4m3 weights (one scale per row): W[n,k] = s[n] * e4m3(w[n,k]), codes in their natural order.
 *
 * Every e4m3 value is exactly a bf16 value: sign, exponent + 120 (bias 7 -> 127), mantissa << 4;
 * the subnormals (exponent 0: m * 2^-9) come from an 8-entry table. Decode multiplies bf16 x by
 * the widened codes with vdpbf16ps (fp32 sums) and scales the row once; prefill writes bf16 tiles
 * of s * e4m3 for the caller's GEMM, as for integer codes. The bit pattern 0x7F (nan) never occurs
 * in qlab's fp8 weights (quantization saturates to 448).
 * ------------------------------------------------------------------------------------------- */
static inline uint16_t e4m3_to_bf16(uint8_t b)
{
    const unsigned mag = b & 0x7Fu, sign = (unsigned)(b & 0x80u) << 8;
    if (mag >= 8) return (uint16_t)(sign | ((mag << 4) + 0x3C00u));
    /* subnormal: m * 2^-9, exact in bf16 */
    static const uint16_t sub[8] = {0x0000, 0x3B00, 0x3B80, 0x3BC0, 0x3C00, 0x3C20, 0x3C40, 0x3C60};
    return (uint16_t)(sign | sub[mag]);
}

#if QLAB_BF16_DOT
/* 32 e4m3 bytes -> 32 bf16 lanes. */
static inline __m512i e4m3x32_to_bf16(const uint8_t *w)
{
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)w));
    const __m512i mag = _mm512_and_si512(v, _mm512_set1_epi16(0x7F));
    const __m512i normal = _mm512_add_epi16(_mm512_slli_epi16(mag, 4), _mm512_set1_epi16(0x3C00));
    const __m512i subtab = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                            0x3C60, 0x3C40, 0x3C20, 0x3C00, 0x3BC0, 0x3B80, 0x3B00, 0x0000);
    const __mmask32 is_sub = _mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8));
    const __m512i val = _mm512_mask_permutexvar_epi16(normal, is_sub, mag, subtab);
    return _mm512_or_si512(val, _mm512_slli_epi16(_mm512_and_si512(v, _mm512_set1_epi16(0x80)), 8));
}
#endif

/* y[M, N] = x[M, K] W^T. x: bf16 [M, K]; w: e4m3 bytes [N, K]; scale: fp32 [N]. K % 32 == 0. */
int qlab_fp8_gemv(int M, long N, long K, const uint16_t *x, const uint8_t *w, const float *scale, float *y,
                  int threads)
{
    if (M < 1 || N < 1 || K < 32 || K % 32) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long n = 0; n < N; n++) {
        const uint8_t *wr = w + n * K;
        for (int m = 0; m < M; m++) {
            const uint16_t *xm = x + (long)m * K;
#if QLAB_BF16_DOT
            __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
            for (long k = 0; k < K; k += 64) {
                _mm_prefetch((const char *)(wr + k + 2048), _MM_HINT_T0);
                p0 = _mm512_dpbf16_ps(p0, (__m512bh)e4m3x32_to_bf16(wr + k), (__m512bh)_mm512_loadu_si512(xm + k));
                if (k + 32 < K)
                    p1 = _mm512_dpbf16_ps(p1, (__m512bh)e4m3x32_to_bf16(wr + k + 32),
                                          (__m512bh)_mm512_loadu_si512(xm + k + 32));
            }
            const float t = _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
#else
            float t = 0.0f;
            for (long k = 0; k < K; k++) t += bf16_to_float(e4m3_to_bf16(wr[k])) * bf16_to_float(xm[k]);
#endif
            y[(long)m * N + n] = scale[n] * t;
        }
    }
    return 0;
}

/* out[n1 - n0, K] = bf16(scale[n] * e4m3(w[n, :])) for n in [n0, n1). K % 32 == 0. */
int qlab_fp8_dequant_bf16(long n0, long n1, long K, const uint8_t *w, const float *scale, uint16_t *out,
                          int threads)
{
    if (n0 < 0 || n1 <= n0 || K < 32 || K % 32) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long n = n0; n < n1; n++) {
        const uint8_t *wr = w + n * K;
        uint16_t *o = out + (n - n0) * K;
#ifdef __AVX512F__
#if QLAB_BF16_DOT
        const __m512 sv = _mm512_set1_ps(scale[n]);
        for (long k = 0; k < K; k += 32) {
            const __m512i b = e4m3x32_to_bf16(wr + k);
            const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(b)), 16));
            const __m512 hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(b, 1)), 16));
            store_bf16(o + k, _mm512_mul_ps(sv, lo));
            store_bf16(o + k + 16, _mm512_mul_ps(sv, hi));
        }
        continue;
#endif
#endif
        for (long k = 0; k < K; k++) o[k] = to_bf16(scale[n] * bf16_to_float(e4m3_to_bf16(wr[k])));
    }
    return 0;
}

int qlab_cpu_bf16(void) { return QLAB_BF16_DOT; }
