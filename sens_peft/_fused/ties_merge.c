/* Fused CPU loops of sens-peft's streamed TIES / DARE-TIES merge (sens_peft/methods.py, merge_streamed).
 *
 * The eager path runs ~30 element-wise torch ops per chunk, each a pass over memory; this does the same
 * arithmetic entry by entry in one pass. It mirrors the eager op sequence exactly, one rounding per operation
 * (compiled with -ffp-contract=off: no fused multiply-adds), so its results are bit-identical to the eager path;
 * tests/test_fused.py holds it to that. Loaded through ctypes by sens_peft/fused.py; no Python or torch headers.
 */
#include <stdint.h>
#include <string.h>

#define BLOCK 256
#define MAX_EXPERTS 16

enum { DT_F32 = 0, DT_BF16 = 1 };
enum { DROP_NONE = 0, DROP_TRIM = 1, DROP_COUNTER = 2, DROP_PACKED = 3, DROP_IMPORTANCE = 4 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0; /* torch's scalar conversion of NaN */
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(u >> 16);
}

static inline void load(float *dst, const void *src, int dtype, int64_t at, int len) {
    if (dtype == DT_BF16) {
        const uint16_t *p = (const uint16_t *)src + at;
        for (int i = 0; i < len; i++) dst[i] = bf16_to_f32(p[i]);
    } else {
        memcpy(dst, (const float *)src + at, (size_t)len * 4);
    }
}

static inline int count_nonfinite(const float *x, int len) {
    int bad = 0;
    for (int i = 0; i < len; i++) {
        uint32_t u;
        memcpy(&u, &x[i], 4);
        bad += ((u >> 23) & 0xFFu) == 0xFFu;
    }
    return bad;
}

/* The "counter" DARE keep-mask (methods.counter_keep): keys[2 * b], keys[2 * b + 1] are the keys of counter block
 * first_block + b (blocks of block_size positions). */
static void counter_keep(float *kp, int64_t pos, int len, const int32_t *keys, int64_t first_block,
                         int64_t block_size, int32_t threshold) {
    int i = 0;
    while (i < len) {
        int64_t block = (pos + i) / block_size;
        int64_t offset = (pos + i) - block * block_size;
        int m = len - i;
        if (offset + m > block_size) m = (int)(block_size - offset);
        uint32_t key1 = (uint32_t)keys[2 * (block - first_block)];
        uint32_t key2 = (uint32_t)keys[2 * (block - first_block) + 1];
        uint32_t from = (uint32_t)offset + key1;
        for (int j = 0; j < m; j++) {
            uint32_t x = (from + (uint32_t)j) * 0x9E3779B9u;
            x ^= x >> 16;
            x *= 0x7FEB352Du;
            x ^= key2;
            x ^= x >> 15;
            x *= 0x846CA68Bu;
            kp[i + j] = (int32_t)x < threshold ? 1.0f : 0.0f;
        }
        i += m;
    }
}

static void packed_keep(float *kp, int64_t pos, int len, const uint8_t *packed) {
    for (int i = 0; i < len; i++) {
        int64_t p = pos + i;
        kp[i] = (float)((packed[p >> 3] >> (p & 7)) & 1);
    }
}

/* hardshrink(d, bound) in place: zero where -bound <= d <= bound (NaN kept); a negative bound keeps all. */
static inline void shrink(float *d, int len, float bound) {
    if (!(bound >= 0.0f)) return;
    float lo = -bound;
    for (int i = 0; i < len; i++) d[i] = (d[i] >= lo && d[i] <= bound) ? 0.0f : d[i];
}

/* keep[i] = 1 where imp[i] > bound, else 0 (methods._keep_chunk). */
static inline void keep_above(float *kp, const float *imp, int len, float bound) {
    for (int i = 0; i < len; i++) kp[i] = imp[i] > bound ? 1.0f : 0.0f;
}

/* Entries [start, start + n) of a TIES (drop = DROP_TRIM, DROP_IMPORTANCE or DROP_NONE) or DARE-TIES (DROP_COUNTER,
 * DROP_PACKED) merge; pointers are to entry 0 of the flat tensors; importance[k]: expert k's fp32 importance map
 * (DROP_IMPORTANCE). Returns the number of non-finite values seen (deltas before a DARE drop or an importance
 * trim, results). */
int64_t sp_ties_merge(int64_t start, int64_t n, const void *base, int base_dtype, int num,
                      const void *const *experts, const int *expert_dtypes, void *out, int out_dtype,
                      const double *coeffs, const double *vote_weight, const int *vote_sign, int count_votes,
                      int drop, const double *above, const double *at_least, const int64_t *tie_end,
                      double density, const int32_t *keys, int64_t first_block, int64_t num_blocks,
                      int64_t block_size, int32_t keep_threshold, const uint8_t *const *packed,
                      const float *const *importance) {
    if (num < 1 || num > MAX_EXPERTS) return -1;
    float bf[BLOCK], mass[BLOCK], sg[BLOCK], ag[BLOCK], total[BLOCK], cnt[BLOCK], kp[BLOCK];
    float d[MAX_EXPERTS][BLOCK];
    float c[MAX_EXPERTS], w[MAX_EXPERTS];
    for (int k = 0; k < num; k++) {
        c[k] = (float)coeffs[k];
        w[k] = (float)vote_weight[k];
    }
    const float dens = (float)density;
    int64_t bad = 0;
    for (int64_t b0 = start; b0 < start + n; b0 += BLOCK) {
        int len = (int)((start + n - b0) < BLOCK ? (start + n - b0) : BLOCK);
        load(bf, base, base_dtype, b0, len);
        for (int k = 0; k < num; k++) {
            float *dk = d[k];
            load(dk, experts[k], expert_dtypes[k], b0, len);
            for (int i = 0; i < len; i++) dk[i] = dk[i] - bf[i];
            if (drop == DROP_COUNTER || drop == DROP_PACKED) {
                bad += count_nonfinite(dk, len);
                if (drop == DROP_COUNTER)
                    counter_keep(kp, b0, len, keys + 2 * (int64_t)k * num_blocks, first_block,
                                 block_size, keep_threshold);
                else
                    packed_keep(kp, b0, len, packed[k]);
                for (int i = 0; i < len; i++) dk[i] = (dk[i] * kp[i]) / dens;
            } else if (drop == DROP_IMPORTANCE) {
                bad += count_nonfinite(dk, len);
                int64_t m = tie_end[k] - b0;
                m = m < 0 ? 0 : (m > len ? len : m);
                keep_above(kp, importance[k] + b0, (int)m, (float)at_least[k]);
                keep_above(kp + m, importance[k] + b0 + m, len - (int)m, (float)above[k]);
                for (int i = 0; i < len; i++) dk[i] = dk[i] * kp[i];
            } else if (drop == DROP_TRIM) {
                int64_t m = tie_end[k] - b0;
                m = m < 0 ? 0 : (m > len ? len : m);
                shrink(dk, (int)m, (float)at_least[k]);
                shrink(dk + m, len - (int)m, (float)above[k]);
            }
            if (!count_votes) {
                if (k == 0)
                    for (int i = 0; i < len; i++) mass[i] = dk[i] * w[0];
                else
                    for (int i = 0; i < len; i++) mass[i] = mass[i] + (w[k] * dk[i]) * 1.0f;
            } else {
                float vs = (float)vote_sign[k];
                for (int i = 0; i < len; i++) {
                    float vote = (float)((dk[i] > 0.0f) - (dk[i] < 0.0f));
                    mass[i] = k == 0 ? vote * vs : mass[i] + vote * vs;
                }
            }
        }
        for (int i = 0; i < len; i++) sg[i] = mass[i] >= 0.0f ? 1.0f : -1.0f;
        int first = 1;
        for (int k = 0; k < num; k++) {
            if (vote_sign[k] == 0) continue;
            const float *dk = d[k];
            if (vote_sign[k] > 0)
                for (int i = 0; i < len; i++) ag[i] = (dk[i] * sg[i]) > 0.0f ? 1.0f : 0.0f;
            else
                for (int i = 0; i < len; i++) ag[i] = (dk[i] * sg[i]) < 0.0f ? 1.0f : 0.0f;
            if (first) {
                for (int i = 0; i < len; i++) {
                    total[i] = (dk[i] * ag[i]) * c[k];
                    cnt[i] = ag[i];
                }
                first = 0;
            } else {
                for (int i = 0; i < len; i++) {
                    total[i] = total[i] + (c[k] * dk[i]) * ag[i];
                    cnt[i] = cnt[i] + ag[i];
                }
            }
        }
        if (first)
            for (int i = 0; i < len; i++) total[i] = cnt[i] = 0.0f;
        for (int i = 0; i < len; i++) bf[i] = bf[i] + total[i] / (cnt[i] < 1.0f ? 1.0f : cnt[i]);
        bad += count_nonfinite(bf, len);
        if (out_dtype == DT_BF16) {
            uint16_t *o = (uint16_t *)out + b0;
            for (int i = 0; i < len; i++) o[i] = f32_to_bf16(bf[i]);
        } else {
            memcpy((float *)out + b0, bf, (size_t)len * 4);
        }
    }
    return bad;
}

/* One expert's pass of the sampled TIES threshold selection (methods._sampled_thresholds), on the scores
 * |expert - base| of entries [0, n) (with base NULL: the fp32 scores `expert` themselves, e.g. an importance map),
 * counted per chunk of `chunk` entries.
 * Tie mode (band = 0): upper = #(score > hi), lower = #(score >= hi), per_chunk[c] = ties (score == hi) in chunk c.
 * Band mode (band = 1): upper = #(score >= hi); the bit patterns of the scores inside (lo, hi) are written, in
 * index order, to gathered (at most cap of them), per_chunk[c] = how many of them chunk c holds.
 * *top = the largest score bit pattern read as int32 (NaN/Inf ones included). Returns how many scores were inside
 * the band (which may exceed cap: the caller then treats the band as missed). */
int64_t sp_count_scores(int64_t n, const void *base, int base_dtype, const void *expert, int expert_dtype,
                        int64_t chunk, double hi_d, double lo_d, int band, int64_t *per_chunk, int64_t *upper,
                        int64_t *lower, int32_t *gathered, int64_t cap, int32_t *top) {
    float b[BLOCK], v[BLOCK];
    const float hi = (float)hi_d, lo = (float)lo_d;
    int64_t up = 0, low = 0, inside = 0;
    int32_t best = 0;
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        int64_t c1 = c0 + chunk < n ? c0 + chunk : n;
        int64_t here = 0;
        for (int64_t b0 = c0; b0 < c1; b0 += BLOCK) {
            int len = (int)(c1 - b0 < BLOCK ? c1 - b0 : BLOCK);
            load(v, expert, expert_dtype, b0, len);
            if (base) {
                load(b, base, base_dtype, b0, len);
                for (int i = 0; i < len; i++) {
                    float s = v[i] - b[i];
                    uint32_t u;
                    memcpy(&u, &s, 4);
                    u &= 0x7FFFFFFFu; /* |s|, as torch's abs (NaN keeps its payload, loses its sign) */
                    memcpy(&v[i], &u, 4);
                }
            }
            int32_t above = 0, at_least = 0;
            int32_t mx = 0;
            for (int i = 0; i < len; i++) {
                float s = v[i];
                int32_t u;
                memcpy(&u, &s, 4);
                mx = u > mx ? u : mx;
                above += band ? (s >= hi) : (s > hi);
                at_least += s >= hi;
            }
            best = mx > best ? mx : best;
            up += above;
            if (!band) {
                low += at_least;
                here += at_least - above;
                continue;
            }
            for (int i = 0; i < len; i++) {
                uint32_t u;
                memcpy(&u, &v[i], 4);
                int in = v[i] > lo && !(v[i] >= hi);
                if (inside < cap) gathered[inside] = (int32_t)u;
                inside += in;
                here += in;
            }
        }
        per_chunk[c0 / chunk] = here;
    }
    *upper = up;
    *lower = low;
    *top = best;
    return inside;
}
