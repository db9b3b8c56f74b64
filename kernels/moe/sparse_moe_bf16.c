/* The whole sparse MoE block of Qwen3-Next for a few tokens (decode, draft verification) in one
 * call: router, top-k, the routed SwiGLU experts and the gated shared expert.
 *
 * Rounding follows the PyTorch path step by step (router logits, projections, SiLU products,
 * expert outputs and weighted outputs rounded to bf16; the routed sum in fp32 in ascending expert
 * order, rounded once; then the gated shared expert added in bf16). Each token is computed alone
 * by the same sequence whatever the token count or thread split, so a verification row equals a
 * decode step bit for bit.
 *
 * Built twice. With AVX-512 BF16, one OpenMP region per call runs token after token: the
 * matrix-vector products of a step (the router; every chosen expert's and the shared expert's
 * gate/up projections; then all their down projections) are shared out over the threads as one
 * list of row blocks, so each thread streams long runs of weights between few barriers. With AVX2 +
 * FMA + F16C (dots_avx2.h's fp32 dot products), the steps run for all tokens at once: the router
 * and the shared expert's projections, then every chosen expert's gate/up for the tokens routed to
 * it, then the down projections, so each chosen expert's weights are read once per call however
 * many tokens chose it. In both, SwiGLU and the block output (block_steps.h) are shared out over the
 * threads too. The two builds give different bits from each other, each always the same.
 */
#include <math.h>
#include <stdlib.h>

#if defined(__AVX512BF16__)
#include "../linear/small_m_bf16.c"
#include "block_steps.h"
#else
/* The scalar bf16 conversions; the header's AVX-512 helpers go unused here, where GCC would warn
 * about their ABI. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#include "../bf16_simd.h"
#pragma GCC diagnostic pop
#include "dots_avx2.h"
#endif

#if defined(__AVX512BF16__)
/* out[n] = x . w[n] (fp32) for n in [0, N): one matrix-vector product of a step. */
typedef struct {
    const uint16_t *x, *w;
    int64_t N, K;
    float *out;
} Product;

#define MAX_PRODUCTS (MAX_TOP_K + 3) /* the top-k routed experts plus the shared expert's three */

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

/* x [T, H] bf16 -> out [T, H] bf16. router [E, H]; gate_up [E, 2I, H] (gate rows first);
 * down [E, H, I]; shared gate/up [S, H], shared down [H, S], shared_gate [1, H]. topk <= MAX_TOP_K.
 * Returns 0, or -1 when work buffers cannot be allocated. */
int sparse_moe_bf16(const uint16_t *x, int64_t T, int64_t H, const uint16_t *router, int64_t E, int64_t topk,
                    int normalize, const uint16_t *gate_up, const uint16_t *down, int64_t I,
                    const uint16_t *shared_gate_proj, const uint16_t *shared_up_proj, const uint16_t *shared_down,
                    int64_t S, const uint16_t *shared_gate, uint16_t *out, int threads) {
    if (topk < 1 || topk > MAX_TOP_K) return -1;
    /* Per routed expert (then the shared one): its gate/up projection [2I] (shared: [2S]), its
     * SwiGLU activation and its down projection [H]. */
    int64_t up_width = 2 * I > 2 * S ? 2 * I : 2 * S, act_width = up_width / 2;
    float *scratch = malloc(sizeof(float) * ((topk + 1) * (up_width + H) + E + 1));
    uint16_t *act = malloc(sizeof(uint16_t) * (topk + 1) * act_width);
    if (!scratch || !act) {
        free(scratch);
        free(act);
        return -1;
    }
    float *proj = scratch, *proj2 = proj + (topk + 1) * up_width, *logits = proj2 + (topk + 1) * H;
    float *gate_logit = logits + E, weight[MAX_TOP_K];
    float *shared_proj = proj + topk * up_width, *shared_out = proj2 + topk * H;
    uint16_t *shared_act = act + topk * act_width;
    int64_t chosen[MAX_TOP_K];
    Product products[MAX_PRODUCTS];
#pragma omp parallel num_threads(threads)
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *xt = x + t * H;
#pragma omp single
        products[0] = (Product){ xt, router, E, H, logits };
        team_products(products, 1);
#pragma omp single
        {
            route_token(logits, E, topk, normalize, chosen, weight);
            for (int64_t j = 0; j < topk; j++)
                products[j] = (Product){ xt, gate_up + chosen[j] * 2 * I * H, 2 * I, H, proj + j * up_width };
            products[topk] = (Product){ xt, shared_gate_proj, S, H, shared_proj };
            products[topk + 1] = (Product){ xt, shared_up_proj, S, H, shared_proj + S };
            products[topk + 2] = (Product){ xt, shared_gate, 1, H, gate_logit };
        }
        team_products(products, (int)topk + 3);
#pragma omp for schedule(static)
        for (int64_t j = 0; j <= topk; j++) {
            int64_t width = j < topk ? I : S;
            swiglu_row(proj + j * up_width, proj + j * up_width + width, width, act + j * act_width);
        }
#pragma omp single
        {
            for (int64_t j = 0; j < topk; j++)
                products[j] = (Product){ act + j * act_width, down + chosen[j] * H * I, H, I, proj2 + j * H };
            products[topk] = (Product){ shared_act, shared_down, H, S, shared_out };
        }
        team_products(products, (int)topk + 1);
        /* The routed outputs, weighted, in ascending expert order; then the gated shared one. */
#pragma omp for schedule(static)
        for (int64_t h0 = 0; h0 < H; h0 += OUTPUT_PIECE)
            block_output(proj2, H, weight, topk, shared_out, gate_logit[0], h0,
                         h0 + OUTPUT_PIECE < H ? h0 + OUTPUT_PIECE : H, out + t * H);
    }
    free(scratch);
    free(act);
    return 0;
}

#else /* AVX2 + FMA + F16C */

/* Weight rows per unit of work shared out over the threads. */
#define WORK_ROWS 16

/* out[g][n] = x[g] . w[n] (fp32) for the M rows x[g] (widened by widen_row) and n < N, w [N, K]. */
typedef struct {
    const float *const *x;
    int64_t M;
    const uint16_t *w;
    int64_t N, K;
    float *const *out;
} Product;

/* first[i]: the products' blocks of WORK_ROWS weight rows before product i (count + 1 entries). */
static void number_blocks(const Product *products, int64_t count, int64_t *first) {
    first[0] = 0;
    for (int64_t i = 0; i < count; i++) first[i + 1] = first[i] + (products[i].N + WORK_ROWS - 1) / WORK_ROWS;
}

/* The product holding row block `block` (numbered by number_blocks). */
static int64_t product_of(const int64_t *first, int64_t count, int64_t block) {
    int64_t low = 0, high = count - 1;
    while (low < high) {
        int64_t middle = (low + high + 1) / 2;
        if (first[middle] <= block) low = middle;
        else high = middle - 1;
    }
    return low;
}

/* team_products for one token: the thread's contiguous run of row blocks cut into STREAM_CHAINS
 * stretches (streaming.h), one row of each computed side by side (one_token_dots) where their depths
 * agree, else one at a time. */
static void one_token_products(const Product *products, int64_t count, const int64_t *first) {
    int threads = omp_get_num_threads(), index = omp_get_thread_num();
    int64_t blocks = first[count], per = (blocks + threads - 1) / threads;
    int64_t lo = index * per * WORK_ROWS, hi = ((index + 1) * per < blocks ? (index + 1) * per : blocks) * WORK_ROWS;
    int64_t stretch = stretch_length(lo, hi, STREAM_CHAINS);
    for (int64_t i = 0; i < stretch; i++) {
        const float *xs[STREAM_CHAINS];
        const uint16_t *ws[STREAM_CHAINS];
        float *outs[STREAM_CHAINS];
        int64_t depth[STREAM_CHAINS];
        int n = 0;
        for (int s = 0; s < STREAM_CHAINS; s++) {
            int64_t at = stretch_row(lo, hi, stretch, s, i);
            if (at < 0) continue;
            int64_t which = product_of(first, count, at / WORK_ROWS), row = at - first[which] * WORK_ROWS;
            const Product *p = &products[which];
            if (row >= p->N) continue; /* past the product's last row, in its last block */
            xs[n] = p->x[0], ws[n] = p->w + row * p->K, outs[n] = p->out[0] + row, depth[n++] = p->K;
        }
        int same = n == STREAM_CHAINS;
        for (int r = 1; r < n; r++) same = same && depth[r] == depth[0];
        if (same) one_token_dots(xs, ws, depth[0], outs, STREAM_CHAINS);
        else
            for (int r = 0; r < n; r++) one_token_dots(xs + r, ws + r, depth[r], outs + r, 1);
    }
#pragma omp barrier
}

/* The products' row blocks (numbered by number_blocks), in order, split over the team in
 * contiguous runs; ends with a barrier. */
static void team_products(const Product *products, int64_t count, const int64_t *first) {
    int one_token = 1;
    for (int64_t i = 0; i < count; i++) one_token = one_token && products[i].M == 1;
    if (one_token) {
        one_token_products(products, count, first);
        return;
    }
    float scratch[DOT_SCRATCH];
#pragma omp for schedule(static)
    for (int64_t block = 0; block < first[count]; block++) {
        int64_t low = product_of(first, count, block);
        const Product *p = &products[low];
        int64_t n0 = (block - first[low]) * WORK_ROWS, rows = p->N - n0 < WORK_ROWS ? p->N - n0 : WORK_ROWS;
        dot_products(p->x, p->M, p->w + n0 * p->K, p->K, rows, p->K, p->out, n0, scratch);
    }
}

/* Work buffers of one call: fp32 and bf16 values, row pointers, routing and the products' lists. */
typedef struct {
    float *values;
    uint16_t *act;
    float *chosen_weight;
    int64_t *chosen, *start, *order, *first;
    const float **rows;
    float **outputs;
    Product *products;
} Buffers;

static void release(Buffers *b) {
    free(b->values), free(b->act), free(b->chosen_weight), free(b->chosen), free(b->start), free(b->order);
    free(b->first), free(b->rows), free(b->outputs), free(b->products);
}

/* x [T, H] bf16 -> out [T, H] bf16. router [E, H]; gate_up [E, 2I, H] (gate rows first);
 * down [E, H, I]; shared gate/up [S, H], shared down [H, S], shared_gate [1, H]. topk <= MAX_TOP_K.
 * Returns 0, or -1 when work buffers cannot be allocated. */
int sparse_moe_bf16(const uint16_t *x, int64_t T, int64_t H, const uint16_t *router, int64_t E, int64_t topk,
                    int normalize, const uint16_t *gate_up, const uint16_t *down, int64_t I,
                    const uint16_t *shared_gate_proj, const uint16_t *shared_up_proj, const uint16_t *shared_down,
                    int64_t S, const uint16_t *shared_gate, uint16_t *out, int threads) {
    if (topk < 1 || topk > MAX_TOP_K) return -1;
    int64_t slots = T * topk, H16 = padded_width(H), I16 = padded_width(I), S16 = padded_width(S);
    int64_t experts_used = slots < E ? slots : E;
    /* fp32: widened tokens, router logits, shared gate/up projections and gate logits; per slot
     * (token t's j-th expert, t * topk + j) its gate/up projection and widened SwiGLU; the shared
     * expert's widened SwiGLU; per slot then per token (shared) the down projection. */
    float *xw, *logits, *shared_proj, *gate_logit, *proj, *act_wide, *shared_act_wide, *down_out;
    int64_t sizes[] = { T * H16, T * E, T * 2 * S, T, slots * 2 * I, slots * I16, T * S16, (slots + T) * H };
    float **parts[] = { &xw, &logits, &shared_proj, &gate_logit, &proj, &act_wide, &shared_act_wide, &down_out };
    int64_t total = 0;
    for (int i = 0; i < 8; i++) total += sizes[i];
    /* Row pointers: per product list, its rows x[g] and outputs out[g]. */
    int64_t row_count = 4 * T + 2 * slots + T;
    Buffers b = {
        malloc(sizeof(float) * (size_t)total), malloc(sizeof(uint16_t) * (size_t)((slots + T) * (I > S ? I : S))),
        malloc(sizeof(float) * (size_t)slots), malloc(sizeof(int64_t) * (size_t)slots),
        malloc(sizeof(int64_t) * (size_t)(E + 1)), malloc(sizeof(int64_t) * (size_t)slots),
        malloc(sizeof(int64_t) * (size_t)(2 * experts_used + 8)), malloc(sizeof(float *) * (size_t)row_count),
        malloc(sizeof(float *) * (size_t)row_count), malloc(sizeof(Product) * (size_t)(2 * experts_used + 5)),
    };
    if (!b.values || !b.act || !b.chosen_weight || !b.chosen || !b.start || !b.order || !b.first || !b.rows ||
        !b.outputs || !b.products) {
        release(&b);
        return -1;
    }
    total = 0;
    for (int i = 0; i < 8; i++) *parts[i] = b.values + total, total += sizes[i];
    /* Tokens' rows for the router and the shared expert: [0, T) widened x, [T, 2T) shared SwiGLU. */
    const float **token_rows = b.rows, **shared_act_rows = b.rows + T;
    const float **slot_x_rows = b.rows + 2 * T, **slot_act_rows = slot_x_rows + slots;
    float **logit_rows = b.outputs, **shared_gate_rows = b.outputs + T, **shared_up_rows = b.outputs + 2 * T;
    float **gate_logit_rows = b.outputs + 3 * T, **slot_proj_rows = b.outputs + 4 * T;
    float **slot_down_rows = slot_proj_rows + slots, **shared_down_rows = slot_down_rows + slots;
    for (int64_t t = 0; t < T; t++) {
        widen_row(x + t * H, H, xw + t * H16);
        token_rows[t] = xw + t * H16, shared_act_rows[t] = shared_act_wide + t * S16;
        logit_rows[t] = logits + t * E, gate_logit_rows[t] = gate_logit + t;
        shared_gate_rows[t] = shared_proj + t * 2 * S, shared_up_rows[t] = shared_proj + t * 2 * S + S;
        shared_down_rows[t] = down_out + (slots + t) * H;
    }
    /* Lists: [0, 4) router and shared expert; then the chosen experts' gate/up; then their down
     * projections and the shared expert's. */
    Product *inputs = b.products, *gate_ups = inputs + 4, *downs = gate_ups + experts_used;
    int64_t *inputs_first = b.first, *gate_ups_first = inputs_first + 5, *downs_first = gate_ups_first + experts_used + 1;
    int64_t used = 0; /* experts chosen by any token */
    inputs[0] = (Product){ token_rows, T, router, E, H, logit_rows };
    inputs[1] = (Product){ token_rows, T, shared_gate_proj, S, H, shared_gate_rows };
    inputs[2] = (Product){ token_rows, T, shared_up_proj, S, H, shared_up_rows };
    inputs[3] = (Product){ token_rows, T, shared_gate, 1, H, gate_logit_rows };
    number_blocks(inputs, 4, inputs_first);

#pragma omp parallel num_threads(threads)
    {
        team_products(inputs, 4, inputs_first);
#pragma omp single
        {
            for (int64_t t = 0; t < T; t++) {
                route_token(logits + t * E, E, topk, normalize, b.chosen + t * topk, b.chosen_weight + t * topk);
                swiglu_row(shared_proj + t * 2 * S, shared_proj + t * 2 * S + S, S, b.act + (slots + t) * S);
                widen_row(b.act + (slots + t) * S, S, shared_act_wide + t * S16);
            }
            /* Slots grouped by expert, tokens ascending within each (a counting sort). */
            for (int64_t e = 0; e <= E; e++) b.start[e] = 0;
            for (int64_t s = 0; s < slots; s++) b.start[b.chosen[s] + 1]++;
            for (int64_t e = 0; e < E; e++) b.start[e + 1] += b.start[e];
            for (int64_t s = 0; s < slots; s++) b.order[b.start[b.chosen[s]]++] = s;
            for (int64_t e = E; e > 0; e--) b.start[e] = b.start[e - 1];
            b.start[0] = 0;
            for (int64_t i = 0; i < slots; i++) {
                int64_t s = b.order[i];
                slot_x_rows[i] = xw + (s / topk) * H16, slot_act_rows[i] = act_wide + s * I16;
                slot_proj_rows[i] = proj + s * 2 * I, slot_down_rows[i] = down_out + s * H;
            }
            for (int64_t e = 0; e < E; e++) {
                int64_t first = b.start[e], count = b.start[e + 1] - first;
                if (count == 0) continue;
                gate_ups[used] = (Product){ slot_x_rows + first, count, gate_up + e * 2 * I * H, 2 * I, H,
                                            slot_proj_rows + first };
                downs[used++] = (Product){ slot_act_rows + first, count, down + e * H * I, H, I, slot_down_rows + first };
            }
            downs[used] = (Product){ shared_act_rows, T, shared_down, H, S, shared_down_rows };
            number_blocks(gate_ups, used, gate_ups_first);
            number_blocks(downs, used + 1, downs_first);
        }
        team_products(gate_ups, used, gate_ups_first);
#pragma omp for schedule(static)
        for (int64_t s = 0; s < slots; s++) {
            swiglu_row(proj + s * 2 * I, proj + s * 2 * I + I, I, b.act + s * I);
            widen_row(b.act + s * I, I, act_wide + s * I16);
        }
        team_products(downs, used + 1, downs_first);
        /* The routed outputs, weighted, in ascending expert order; then the gated shared one. */
        const int64_t pieces = (H + OUTPUT_PIECE - 1) / OUTPUT_PIECE;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < T * pieces; item++) {
            int64_t t = item / pieces, h0 = item % pieces * OUTPUT_PIECE;
            int64_t h1 = h0 + OUTPUT_PIECE < H ? h0 + OUTPUT_PIECE : H;
            block_output(down_out + t * topk * H, H, b.chosen_weight + t * topk, topk, down_out + (slots + t) * H,
                         gate_logit[t], h0, h1, out + t * H);
        }
    }
    release(&b);
    return 0;
}
#endif
