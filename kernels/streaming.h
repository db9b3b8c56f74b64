/* How the AVX2 builds stream a weight matrix they read once, a few rows of x at a time (decode's
 * products): STREAM_CHAINS independent fp32 chains each walk their own stretch of weight rows front to
 * back, requesting the line STREAM_AHEAD_BYTES further on into L1. On a Zen 3 (2 cores), eight
 * rows interleaved at a row's distance streamed at 16-23 GB/s, four sequential stretches at 27-29:
 * its rate for a plain sequential read. */
#ifndef DOCANALYST_STREAMING_H
#define DOCANALYST_STREAMING_H

#define STREAM_CHAINS 4
#define STREAM_AHEAD_BYTES 8192

#endif
