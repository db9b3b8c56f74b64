/* The whole sparse MoE block of Qwen3-Next for a few tokens (decode, draft verification) in one
 * call: router, top-k, the routed SwiGLU experts and the gated shared expert.
 *
 * Rounding follows the PyTorch path step by step (router logits, projections, SiLU products,
 * expert outputs and weighted outputs rounded to bf16; the routed sum in fp32 in ascending expert
 * order, rounded once; then the gated shared expert added in bf16). Each token is computed alone
 * by the same sequence whatever the token count or thread split, so a verification row equals a
 * decode step bit for bit. One OpenMP region per call: the matrix-vector products of a step (the
 * router; every chosen expert's and the shared expert's gate/up projections; then all their down
 * projections) are shared out over the threads as one list of row blocks, so each thread streams
 * long runs of weights between few barriers; the small elementwise steps run on one thread.
 */
#include "../linear/small_m_bf16.c"

#include <math.h>
#include <stdlib.h>

/* out[n] = x . w[n] (fp32) for n in [0, N): one matrix-vector product of a step. */
typedef struct {
    const uint16_t *x, *w;
    int64_t N, K;
    float *out;
} Product;

#define MAX_PRODUCTS 72 /* top-k (at most 64) routed experts plus the shared expert's three */

/* The products' row blocks, in order, split over the team in contiguous runs; ends with a barrier. */
static void team_products(const Product *products, int count) {
    int64_t first[MAX_PRODUCTS + 1];
    first[0] = 0;
    for (int i = 0; i < count; i++) first[i + 1] = first[i] + (products[i].N + BLOCK - 1) / BLOCK;
#pragma omp for schedule(static)
    for (int64_t block = 0; block < first[count]; block++) {
        int i = 0;
        while (block >= first[i + 1]) i++;
        const Product *p = &products[i];
        int64_t local = block - first[i];
        run_blocks(p->x, p->K, 1, p->w, p->K, p->N, p->K, p->out, p->N, 1, local, local + 1);
    }
}

/* bf16(silu(bf16(gate)) ) * bf16(up), rounded, as F.silu(gate) * up on bf16 tensors. */
static void swiglu(const float *gate, const float *up, int64_t width, uint16_t *act) {
    for (int64_t i = 0; i < width; i++) {
        float g = round_bf16(gate[i]);
        float silu = round_bf16(g / (1.0f + expf(-g)));
        act[i] = float_to_bf16(silu * round_bf16(up[i]));
    }
}

/* x [T, H] bf16 -> out [T, H] bf16. router [E, H]; gate_up [E, 2I, H] (gate rows first);
 * down [E, H, I]; shared gate/up [S, H], shared down [H, S], shared_gate [1, H]. topk <= 64.
 * Returns 0, or -1 when work buffers cannot be allocated. */
int sparse_moe_bf16(const uint16_t *x, int64_t T, int64_t H, const uint16_t *router, int64_t E, int64_t topk,
                    int normalize, const uint16_t *gate_up, const uint16_t *down, int64_t I,
                    const uint16_t *shared_gate_proj, const uint16_t *shared_up_proj, const uint16_t *shared_down,
                    int64_t S, const uint16_t *shared_gate, uint16_t *out, int threads) {
    if (topk > 64) return -1;
    /* Per routed expert (then the shared one): its gate/up projection [2I] (shared: [2S]), its
     * SwiGLU activation and its down projection [H]. */
    int64_t up_width = 2 * I > 2 * S ? 2 * I : 2 * S, act_width = up_width / 2;
    float *scratch = malloc(sizeof(float) * ((topk + 1) * (up_width + H) + E + H + 1));
    uint16_t *act = malloc(sizeof(uint16_t) * (topk + 1) * act_width);
    if (!scratch || !act) {
        free(scratch);
        free(act);
        return -1;
    }
    float *proj = scratch, *proj2 = proj + (topk + 1) * up_width, *logits = proj2 + (topk + 1) * H;
    float *total = logits + E, *gate_logit = total + H;
    float *shared_proj = proj + topk * up_width, *shared_out = proj2 + topk * H;
    uint16_t *shared_act = act + topk * act_width;
    int64_t chosen[64];
    uint16_t chosen_weight[64];
    Product products[MAX_PRODUCTS];
#pragma omp parallel num_threads(threads)
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *xt = x + t * H;
#pragma omp single
        products[0] = (Product){ xt, router, E, H, logits };
        team_products(products, 1);
#pragma omp single
        {
            /* softmax over bf16-rounded logits in fp32, top-k (lowest index first on ties) */
            float best = -INFINITY, sum = 0.0f;
            for (int64_t e = 0; e < E; e++) {
                logits[e] = round_bf16(logits[e]);
                best = logits[e] > best ? logits[e] : best;
            }
            for (int64_t e = 0; e < E; e++) sum += (logits[e] = expf(logits[e] - best));
            for (int64_t e = 0; e < E; e++) logits[e] /= sum;
            float picked_sum = 0.0f, picked[64];
            for (int64_t j = 0; j < topk; j++) {
                int64_t arg = -1;
                for (int64_t e = 0; e < E; e++)
                    if (logits[e] >= 0.0f && (arg < 0 || logits[e] > logits[arg])) arg = e;
                chosen[j] = arg;
                picked[j] = logits[arg];
                picked_sum += picked[j];
                logits[arg] = -1.0f;
            }
            /* ascending expert id: the order the grouped path adds contributions in */
            for (int64_t a = 1; a < topk; a++)
                for (int64_t b = a; b > 0 && chosen[b] < chosen[b - 1]; b--) {
                    int64_t id = chosen[b]; chosen[b] = chosen[b - 1]; chosen[b - 1] = id;
                    float p = picked[b]; picked[b] = picked[b - 1]; picked[b - 1] = p;
                }
            for (int64_t j = 0; j < topk; j++) chosen_weight[j] = float_to_bf16(normalize ? picked[j] / picked_sum : picked[j]);
            for (int64_t h = 0; h < H; h++) total[h] = 0.0f;
            for (int64_t j = 0; j < topk; j++)
                products[j] = (Product){ xt, gate_up + chosen[j] * 2 * I * H, 2 * I, H, proj + j * up_width };
            products[topk] = (Product){ xt, shared_gate_proj, S, H, shared_proj };
            products[topk + 1] = (Product){ xt, shared_up_proj, S, H, shared_proj + S };
            products[topk + 2] = (Product){ xt, shared_gate, 1, H, gate_logit };
        }
        team_products(products, (int)topk + 3);
#pragma omp single
        {
            for (int64_t j = 0; j < topk; j++) {
                swiglu(proj + j * up_width, proj + j * up_width + I, I, act + j * act_width);
                products[j] = (Product){ act + j * act_width, down + chosen[j] * H * I, H, I, proj2 + j * H };
            }
            swiglu(shared_proj, shared_proj + S, S, shared_act);
            products[topk] = (Product){ shared_act, shared_down, H, S, shared_out };
        }
        team_products(products, (int)topk + 1);
#pragma omp single
        {
            for (int64_t j = 0; j < topk; j++) {
                float weight = bf16_to_float(chosen_weight[j]);
                for (int64_t h = 0; h < H; h++) total[h] += round_bf16(round_bf16(proj2[j * H + h]) * weight);
            }
            float g = round_bf16(gate_logit[0]);
            float gate = round_bf16(1.0f / (1.0f + expf(-g)));
            for (int64_t h = 0; h < H; h++) {
                float shared = round_bf16(gate * round_bf16(shared_out[h]));
                out[t * H + h] = float_to_bf16(round_bf16(total[h]) + shared);
            }
        }
    }
    free(scratch);
    free(act);
    return 0;
}
