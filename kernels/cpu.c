/*
 * qlab CPU kernels: weight-only quantized matmul with dequantization on the fly.
 *
 * Weight layout ("kernel blocks", built from the codes by qlab/kernels/cpu.py, a runtime copy of
 * the stored qlab.packing codes): each row of K codes of b bits (b in 2, 4, 8; c = 8/b codes per
 * byte) is cut into blocks of B = 16c inputs stored in 16 bytes, byte l of a block holding the codes
 * of inputs blk*B + 16*i + l (i = 0..c-1) in bits [i*b, (i+1)*b). Widening 16 bytes then gives c
 * vectors of 16 consecutive inputs, so x and the output are read and written contiguously (the
 * layout llama.cpp's Q4_0 uses for the same reason). Scales, zeros are per row and group of g
 * inputs (g a multiple of B):
 *
 *     affine:    W[n,k] = s[n,k/g] * (u[n,k] - z[n,k/g])
 *     codebook:  W[n,k] = s[n,k/g] * T[u[n,k]]          (b = 4, T a 16-entry table)
 *
 * qlab_gemv (few rows of x: memory-bound) reads each code once per row of x, never a float W:
 *     y[m,n] = sum_g s_g * (x_g . u_g) - (s_g z_g) * sum(x_g)      (zero folded out of the loop)
 * qlab_dequant_bf16 (many rows of x: compute-bound) writes a block of rows of W in bf16 into a
 * buffer small enough to stay in cache; the caller multiplies it with torch's bf16 GEMM (oneDNN,
 * AMX where the CPU has it) and moves on to the next block, so the whole float W never exists.
 *
 * With AVX-512 (gcc -march=native defines __AVX512F__) the loops are written with intrinsics; the
 * portable branch does the same arithmetic lane by lane and is what other CPUs run (tests build
 * both). Threads: OpenMP over output rows.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define QLAB_CPU_ABI 2

int qlab_cpu_abi(void) { return QLAB_CPU_ABI; }

int qlab_cpu_avx512(void)
{
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------------------------------------
 * Decode: one output row (n) against one row of x.
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
static inline float bf16_to_float(uint16_t h)
{
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

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
static inline uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

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
