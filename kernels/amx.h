/* AMX tiles for bf16 products: asking Linux for the tile state, one tile layout for every tile
 * (16 rows of 64 bytes: 16 x 32 bf16 for A, 16 pair rows x 16 columns for B, 16 x 16 fp32 for C),
 * and loading it on the calling thread. Build with -mamx-tile -mamx-bf16; run only where the
 * process's matmuls already use AMX (the Python side checks). */
#ifndef DOCANALYST_AMX_H
#define DOCANALYST_AMX_H

#include <immintrin.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_ROWS 16
#define AMX_ROW_BYTES 64

typedef struct __attribute__((aligned(64))) {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileConfig;

/* Whether this process may use the tile registers (Linux hands them out on request, once). */
static inline int amx_permitted(void) {
    static int permitted = -1;
    if (permitted < 0) {
        const long request_permission = 0x1023, tile_data = 18; /* ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA */
        permitted = syscall(SYS_arch_prctl, request_permission, tile_data) == 0;
    }
    return permitted;
}

/* Gives the calling thread 8 tiles of 16 rows x 64 bytes; pair with _tile_release(). */
static inline void amx_configure(void) {
    TileConfig config = { .palette = 1 };
    for (int t = 0; t < 8; t++) {
        config.bytes_per_row[t] = AMX_ROW_BYTES;
        config.rows[t] = AMX_ROWS;
    }
    _tile_loadconfig(&config);
}

#endif
