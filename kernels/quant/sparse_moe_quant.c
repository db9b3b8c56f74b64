/* The sparse MoE block of Qwen3-Next / Qwen3.5 for a few tokens (decode, draft verification) in one
 * call, its weights read straight from their stored bytes (fp8 blocks, int8, int4, or bf16 as
 * stored: see quant_dot.h): router, top-k, the chosen experts' gate/up projections, SwiGLU and down
 * projections, and the shared expert scaled by its sigmoid gate.
 *
 * Rounding follows the module path's steps (router logits, projections, SiLU and its product with
 * up, expert outputs and weighted outputs rounded to bf16; the routed sum in fp32 in ascending
 * expert order, rounded once; then the gated shared expert added in bf16), as the bf16 block kernel
 * does, with its routing, SwiGLU and block output (../moe/block_steps.h). Every product is one of
 * quant_dot.h's fixed fp32 chains per output, so a token's bits do not depend on the other tokens
 * of the call (which rows share a pass over an expert's weights) or on the thread count (which
 * thread takes which block of weight rows).
 *
 * Memory. The tokens' work is grouped by expert: each chosen expert's weights are read once per call
 * however many tokens chose it. One OpenMP region per call runs three steps of products (the router,
 * the shared expert's gate/up and its gate logit; every chosen expert's gate/up; every down
 * projection), each shared out over the threads as one list of weight-row blocks in contiguous runs,
 * so a thread streams long runs of weights between few barriers; SwiGLU (by expert slot) and the
 * block output (by pieces of columns) are shared out too.
 */
#include <omp.h>
#include <stdint.h>

#include "quant_dot.h"
#include "../moe/block_steps.h"

enum { ROUTER, GATE, UP, DOWN, SHARED_GATE, SHARED_UP, SHARED_DOWN, SHARED_EXPERT_GATE, WEIGHT_COUNT };

/* Rows of prepared activations: one layout for the formats of prepare_row's plain rows, one for int4,
 * one for int4 by pair products (x is bf16, and SwiGLU's outputs are rounded to bf16: exact). */
enum { PLAIN_LAYOUT, INT4_LAYOUT, PAIRS_LAYOUT, LAYOUTS };
static inline int layout_of(const weight_ref *w, int int4_pairs) {
    if (w->format != FORMAT_INT4) return PLAIN_LAYOUT;
    return int4_pairs && takes_pairs(FORMAT_INT4, w->group) ? PAIRS_LAYOUT : INT4_LAYOUT;
}
static const int layout_format[LAYOUTS] = { FORMAT_BF16, FORMAT_INT4, FORMAT_INT4 };

/* The product of `w` (expert `expert` of a stack) with the M rows `x` prepared in the layout of
 * `w` and `int4_pairs` into the fp32 rows `y`. */
static problem product(const weight_ref *w, int64_t expert, const float *const *x, int64_t M, float *const *y,
                       int int4_pairs) {
    const char *scale = (const char *)(uintptr_t)w->scale;
    problem p = { (int)w->format, x, prepared_width(w->columns), M, w->columns, w->rows,
                  (const uint8_t *)(uintptr_t)w->data + expert * w->expert_bytes, w->row_bytes,
                  scale == NULL ? NULL : scale + expert * w->expert_scales * (w->scale_bf16 ? 2 : 4),
                  (int)w->scale_bf16, w->scale_stride, w->group, NULL, 0, (void *const *)y, 0,
                  layout_of(w, int4_pairs) == PAIRS_LAYOUT, NULL };
    return p;
}

/* A step's products; `first[i]` counts the row blocks before product i. */
typedef struct {
    problem *items;
    int64_t count;
    int64_t *first;
} step;

static void number_blocks(step *s) {
    s->first[0] = 0;
    for (int64_t i = 0; i < s->count; i++) s->first[i + 1] = s->first[i] + row_blocks(&s->items[i]);
}

/* The step's row blocks, in order, split over the team in contiguous runs; ends with a barrier. */
static void team_products(const step *s, float *scratch) {
    int threads = omp_get_num_threads(), index = omp_get_thread_num();
    int64_t total = s->first[s->count], per = (total + threads - 1) / threads;
    int64_t begin = index * per, end = begin + per < total ? begin + per : total;
    for (int64_t i = 0; i < s->count && begin < end; i++) {
        int64_t lo = begin > s->first[i] ? begin : s->first[i], hi = end < s->first[i + 1] ? end : s->first[i + 1];
        if (lo < hi) run_blocks(&s->items[i], lo - s->first[i], hi - s->first[i], scratch);
    }
#pragma omp barrier
}

/* Work buffers of one call, sized for `T` tokens. */
typedef struct {
    float *x[LAYOUTS];    /* the tokens' x prepared in each layout [T, x_width] */
    float *logits;        /* [T, E] */
    float *gate_logit;    /* [T] */
    int64_t *chosen;      /* [T, topk] */
    float *weight;        /* [T, topk] */
    float *proj;          /* per slot (token t's j-th expert at t * topk + j, its shared expert at
                             T * topk + t): gate/up projection [2 * proj_half] */
    uint16_t *swiglu;     /* per slot: SwiGLU in bf16 [proj_half] (a float's room each, from the pool) */
    float *act;           /* per slot: SwiGLU prepared for its down projection [act_width] */
    float *down;          /* per slot: down projection [H] */
    float *scratch;       /* per thread: fp8's scaled x [QUANT_MAX_ROWS, scratch_width] */
    problem *items;       /* the products of a step */
    int64_t *first;
    const float **x_rows; /* row pointers of the products */
    float **y_rows;
    int64_t *order;       /* routed slots by (expert, token) */
} buffers;

/* x [T, H] bf16 (T <= QUANT_MAX_ROWS) -> out [T, H] bf16 with the weights `w` [WEIGHT_COUNT]:
 * router [E, H]; gate and up [E, I, H] stacks; down [E, H, I] stack; shared gate/up [S, H];
 * shared down [H, S]; shared expert gate [1, H]. */
static int moe_tokens(const uint16_t *x, int64_t T, const weight_ref *w, int64_t topk, int normalize, uint16_t *out,
                      int int4_pairs, int threads) {
    const int64_t E = w[ROUTER].rows, H = w[ROUTER].columns, I = w[GATE].rows, S = w[SHARED_GATE].rows;
    const int64_t routed = T * topk, slots = routed + T;
    const int64_t x_width = prepared_width(H), proj_half = I > S ? I : S;
    const int64_t act_width = prepared_width(proj_half), scratch_width = x_width > act_width ? x_width : act_width;
    /* Step 1: router, shared gate, shared up, shared expert gate; step 2: gate and up of each routed
     * (expert, token) run; step 3: down of each run and the shared down. */
    const int64_t max_items = 2 * routed + 4;
    if (threads < 1) threads = 1;
    buffers b;
    size_t floats = (size_t)(LAYOUTS * T * x_width + T * E + T + routed + slots * (3 * proj_half + act_width + H) +
                             threads * QUANT_MAX_ROWS * scratch_width);
    float *pool = malloc(sizeof(float) * floats);
    void *pointers = malloc(sizeof(int64_t) * (size_t)(2 * max_items + 1 + 2 * routed) +
                            sizeof(problem) * (size_t)max_items + sizeof(void *) * (size_t)(4 * slots + 8 * T));
    if (pool == NULL || pointers == NULL) {
        free(pool);
        free(pointers);
        return -1;
    }
    for (int layout = 0; layout < LAYOUTS; layout++) b.x[layout] = pool + layout * T * x_width;
    b.logits = pool + LAYOUTS * T * x_width;
    b.gate_logit = b.logits + T * E;
    b.weight = b.gate_logit + T;
    b.proj = b.weight + routed;
    b.swiglu = (uint16_t *)(b.proj + slots * 2 * proj_half);
    b.act = b.proj + slots * 3 * proj_half;
    b.down = b.act + slots * act_width;
    b.scratch = b.down + slots * H;
    b.chosen = pointers;
    b.order = b.chosen + routed;
    b.first = b.order + routed;
    b.items = (problem *)(b.first + 2 * max_items + 1);
    b.x_rows = (const float **)(b.items + max_items);
    b.y_rows = (float **)(b.x_rows + 2 * slots + 4 * T);
    step first = { b.items, 0, b.first }, second = first, third = first;

#pragma omp parallel num_threads(threads)
    {
        float *scratch = b.scratch + omp_get_thread_num() * QUANT_MAX_ROWS * scratch_width;
#pragma omp single
        {
            const float **xr = b.x_rows;
            float **yr = b.y_rows;
            /* x in the layouts of the weights that read it (all but the down projections). */
            int used[LAYOUTS] = { 0 };
            for (int i = 0; i < WEIGHT_COUNT; i++)
                if (i != DOWN && i != SHARED_DOWN) used[layout_of(&w[i], int4_pairs)] = 1;
            for (int64_t t = 0; t < T; t++)
                for (int layout = 0; layout < LAYOUTS; layout++)
                    if (used[layout])
                        prepare_for(x + t * H, 1, H, layout_format[layout], layout == PAIRS_LAYOUT,
                                    b.x[layout] + t * x_width, x_width);
            /* Step 1 for every token at once: each weight's rows of x, then its output rows. */
            static const int shared_inputs[4] = { ROUTER, SHARED_GATE, SHARED_UP, SHARED_EXPERT_GATE };
            for (int i = 0; i < 4; i++) {
                const weight_ref *ref = &w[shared_inputs[i]];
                for (int64_t t = 0; t < T; t++) {
                    float *shared_proj = b.proj + (routed + t) * 2 * proj_half;
                    float *outputs[4] = { b.logits + t * E, shared_proj, shared_proj + S, b.gate_logit + t };
                    xr[t] = b.x[layout_of(ref, int4_pairs)] + t * x_width;
                    yr[t] = outputs[i];
                }
                first.items[first.count++] = product(ref, 0, xr, T, yr, int4_pairs);
                xr += T;
                yr += T;
            }
            number_blocks(&first);
        }
        team_products(&first, scratch);
#pragma omp single
        {
            for (int64_t t = 0; t < T; t++)
                route_token(b.logits + t * E, E, topk, normalize, b.chosen + t * topk, b.weight + t * topk);
            /* Routed slots ordered by expert, then token: each expert's tokens share one pass. */
            for (int64_t s = 0; s < routed; s++) {
                int64_t key = b.chosen[s] * T + s / topk, at = s;
                for (; at > 0 && b.chosen[b.order[at - 1]] * T + b.order[at - 1] / topk > key; at--)
                    b.order[at] = b.order[at - 1];
                b.order[at] = s;
            }
            second.items = b.items;
            second.count = 0;
            const float **xr = b.x_rows;
            float **yr = b.y_rows;
            for (int64_t start = 0, end; start < routed; start = end) {
                int64_t expert = b.chosen[b.order[start]];
                for (end = start; end < routed && b.chosen[b.order[end]] == expert;) end++;
                int64_t count = end - start;
                for (int64_t i = 0; i < count; i++) {
                    int64_t slot = b.order[start + i], token = slot / topk;
                    xr[i] = b.x[layout_of(&w[GATE], int4_pairs)] + token * x_width;
                    xr[count + i] = b.x[layout_of(&w[UP], int4_pairs)] + token * x_width;
                    yr[i] = b.proj + slot * 2 * proj_half;
                    yr[count + i] = b.proj + slot * 2 * proj_half + I;
                }
                second.items[second.count++] = product(&w[GATE], expert, xr, count, yr, int4_pairs);
                second.items[second.count++] = product(&w[UP], expert, xr + count, count, yr + count, int4_pairs);
                xr += 2 * count;
                yr += 2 * count;
            }
            number_blocks(&second);
        }
        team_products(&second, scratch);
#pragma omp for schedule(static)
        for (int64_t slot = 0; slot < slots; slot++) {
            int shared = slot >= routed;
            int64_t width = shared ? S : I;
            float *gate = b.proj + slot * 2 * proj_half;
            const weight_ref *down = &w[shared ? SHARED_DOWN : DOWN];
            int layout = layout_of(down, int4_pairs);
            uint16_t *swiglu = b.swiglu + slot * proj_half;
            swiglu_row(gate, gate + width, width, swiglu);
            prepare_for(swiglu, 1, width, layout_format[layout], layout == PAIRS_LAYOUT, b.act + slot * act_width,
                        act_width);
        }
#pragma omp single
        {
            third.items = b.items;
            third.count = 0;
            const float **xr = b.x_rows;
            float **yr = b.y_rows;
            for (int64_t start = 0, end; start < routed; start = end) {
                int64_t expert = b.chosen[b.order[start]];
                for (end = start; end < routed && b.chosen[b.order[end]] == expert; end++) {
                    xr[end - start] = b.act + b.order[end] * act_width;
                    yr[end - start] = b.down + b.order[end] * H;
                }
                third.items[third.count++] = product(&w[DOWN], expert, xr, end - start, yr, int4_pairs);
                xr += end - start;
                yr += end - start;
            }
            for (int64_t t = 0; t < T; t++) {
                xr[t] = b.act + (routed + t) * act_width;
                yr[t] = b.down + (routed + t) * H;
            }
            third.items[third.count++] = product(&w[SHARED_DOWN], 0, xr, T, yr, int4_pairs);
            number_blocks(&third);
        }
        team_products(&third, scratch);
        const int64_t pieces = (H + OUTPUT_PIECE - 1) / OUTPUT_PIECE;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < T * pieces; item++) {
            int64_t t = item / pieces, h0 = item % pieces * OUTPUT_PIECE;
            block_output(b.down + t * topk * H, H, b.weight + t * topk, topk, b.down + (routed + t) * H,
                         b.gate_logit[t], h0, h0 + OUTPUT_PIECE < H ? h0 + OUTPUT_PIECE : H, out + t * H);
        }
    }
    free(pool);
    free(pointers);
    return 0;
}

/* Which build this is: 16 lanes (AVX-512) or 8 (AVX2). */
void sparse_moe_quant_lanes(int32_t *lanes) { *lanes = LANES; }

/* x [T, H] bf16 -> out [T, H] bf16 through the MoE block whose WEIGHT_COUNT weights `w` describes
 * (see moe_tokens), top-k experts a token (at most MAX_TOP_K), over up to `threads` threads; with
 * `int4_pairs`, int4 weights take pair products where the build and their group allow (quant_dot.h).
 * Tokens go through in runs of QUANT_MAX_ROWS. Returns 0, or -1 when work buffers cannot be
 * allocated or top-k is out of range. */
int sparse_moe_quant(const uint16_t *x, int64_t T, const int64_t *w, int64_t topk, int normalize, uint16_t *out,
                     int int4_pairs, int threads) {
    const weight_ref *weights = (const weight_ref *)w;
    if (topk < 1 || topk > MAX_TOP_K || topk > weights[ROUTER].rows) return -1;
    int64_t H = weights[ROUTER].columns;
    for (int64_t t0 = 0; t0 < T; t0 += QUANT_MAX_ROWS) {
        int64_t count = T - t0 < QUANT_MAX_ROWS ? T - t0 : QUANT_MAX_ROWS;
        if (moe_tokens(x + t0 * H, count, weights, topk, normalize, out + t0 * H, int4_pairs, threads) != 0)
            return -1;
    }
    return 0;
}
