/* How the AVX2 builds stream a weight matrix they read once, a few rows of x at a time (decode's
 * products): STREAM_CHAINS independent fp32 chains each walk their own stretch of weight rows front to
 * back, requesting the line STREAM_AHEAD_BYTES further on into L1. On a Zen 3 (2 cores), eight
 * rows interleaved at a row's distance streamed at 16-23 GB/s, four sequential stretches at 27-29:
 * its rate for a plain sequential read. */
#ifndef DOCANALYST_STREAMING_H
#define DOCANALYST_STREAMING_H

#include <stdint.h>

#define STREAM_CHAINS 4
#define STREAM_AHEAD_BYTES 8192

/* Rows [first, end) cut into `streams` stretches of this many rows (the last may be shorter). */
static inline int64_t stretch_length(int64_t first, int64_t end, int64_t streams) {
    return end > first ? (end - first + streams - 1) / streams : 0;
}

/* Row i of stretch s of [first, end), or -1 where that stretch has run out. */
static inline int64_t stretch_row(int64_t first, int64_t end, int64_t stretch, int64_t s, int64_t i) {
    int64_t row = first + s * stretch + i;
    return row < end ? row : -1;
}

#endif
