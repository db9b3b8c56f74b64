/* The Gated DeltaNet input projections as the checkpoint lays them out, grouped per key head, split
 * into the tensors the conv, the gates, the delta rule and the output norm take (pure copies):
 *
 *   qkvz [T, Hk, 2 Dk + 2 g Dv] (q | k | the head's g value heads' v | their z), g = HV / Hk
 *   ba   [T, Hk, 2 g]           (b | a)
 *   ->  qkv [T, C] = q | k | v (C = 2 Hk Dk + HV Dv), z [T, HV, Dv], b and a [T, HV]
 *
 * Rows of qkvz and ba have their own strides; z may be NULL (the decode step does not need it).
 */
#include <omp.h>
#include <stdint.h>
#include <string.h>

void split_projections_bf16(const uint16_t *qkvz, int64_t ld_qkvz, const uint16_t *ba, int64_t ld_ba, int64_t T,
                            int64_t Hk, int64_t HV, int64_t Dk, int64_t Dv, uint16_t *qkv, uint16_t *z, uint16_t *b,
                            uint16_t *a, int threads) {
    int64_t group = HV / Hk, C = 2 * Hk * Dk + HV * Dv, head_width = 2 * Dk + 2 * group * Dv;
    if (T * C < (1 << 16)) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        uint16_t *row = qkv + t * C;
        for (int64_t h = 0; h < Hk; h++) {
            const uint16_t *head = qkvz + t * ld_qkvz + h * head_width;
            memcpy(row + h * Dk, head, sizeof(uint16_t) * Dk);
            memcpy(row + Hk * Dk + h * Dk, head + Dk, sizeof(uint16_t) * Dk);
            memcpy(row + 2 * Hk * Dk + h * group * Dv, head + 2 * Dk, sizeof(uint16_t) * group * Dv);
            if (z) memcpy(z + t * HV * Dv + h * group * Dv, head + 2 * Dk + group * Dv, sizeof(uint16_t) * group * Dv);
            for (int64_t j = 0; j < group; j++) {
                b[t * HV + h * group + j] = ba[t * ld_ba + h * 2 * group + j];
                a[t * HV + h * group + j] = ba[t * ld_ba + h * 2 * group + group + j];
            }
        }
    }
}
