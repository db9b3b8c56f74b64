/* Flush-to-zero and denormals-are-zero on every thread of the OpenMP pool that PyTorch and the
 * kernels share: torch.set_flush_denormal only sets them on the calling thread, and the pool's
 * other threads went on computing underflowing decays as denormals, ~4x slower there. */
#include <immintrin.h>
#include <omp.h>

#define FLUSH_BITS 0x8040u /* FTZ (bit 15) | DAZ (bit 6) of MXCSR */

void set_flush_denormals(int threads, int enabled) {
#pragma omp parallel num_threads(threads)
    _mm_setcsr(enabled ? _mm_getcsr() | FLUSH_BITS : _mm_getcsr() & ~FLUSH_BITS);
}
