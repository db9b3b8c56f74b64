"""ctypes bindings of the native gated delta rule: `delta_step_bf16.c` (conv update, gates and delta
rule for a few bf16 tokens), `split_bf16.c` (the checkpoint's grouped projections split apart) and
`chunk_bf16.c` (the chunked form for prefill). Each is built for AVX-512 with and without BF16 and
for AVX2 + FMA + F16C; the CPU's best build runs (kernels.native.Kernel)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..native import FEW_TOKENS, Kernel

HERE = Path(__file__).parent
ISAS = ("avx512", "avx512f", "avx2")
# The C kernels step through the key and value dims this many floats at a time (one AVX-512
# vector, two AVX2 ones), so K and V must be multiples of it.
DIM_MULTIPLE = 16
# Largest chunk the native chunked kernel takes. Its per-thread work block grows with the chunk
# (about C (6 K + 3 V) + 2 C^2 floats: 288 KiB at C = 64, K = V = 128) and must stay in L2; the
# triangular parts grow with C while the state products do not, so larger chunks only run slower.
MAX_CHUNK = 64
# Tokens per chunk of the native kernel when the caller leaves it open: 16 ran fastest of
# 16/32/48/64 at 2,048 tokens (H=4, HV=8, K=V=64, 2 threads; AVX-512) and at 4,096 tokens of the
# 80B's shapes (H=16, HV=32, K=V=128; AVX2), for the same reason. PyTorch's chunked form takes 32
# (the package's CHUNK_SIZE): it multiplies all heads' chunks at once, where this works on one.
CHUNK_SIZE = 16

STEP = Kernel(HERE / "delta_step_bf16.c", "gated_delta_step_bf16", "piiiiippippppppn", isas=ISAS, returns="n")
GROUPED_STEP = Kernel(HERE / "delta_step_bf16.c", "gated_delta_step_grouped_bf16", "pipiiiiiippippppn",
                      isas=ISAS, returns="n")
SPLIT = Kernel(HERE / "split_bf16.c", "split_projections_bf16", "pipiiiiiippppn", isas=ISAS)
CHUNK = Kernel(HERE / "chunk_bf16.c", "gated_delta_chunk_bf16", "ppiipiippiiiiifippiin", isas=ISAS, returns="n")
KERNELS = (STEP, GROUPED_STEP, SPLIT, CHUNK)


def _runnable(entry: Kernel) -> Kernel | None:
    return entry if entry.available() else None


def kernel() -> Kernel | None:
    """The step `gated_delta_step_bf16`, or None where no build runs here."""
    return _runnable(STEP)


def grouped_kernel() -> Kernel | None:
    """The step on grouped projections `gated_delta_step_grouped_bf16`, or None where no build runs here."""
    return _runnable(GROUPED_STEP)


def split_kernel() -> Kernel | None:
    """`split_projections_bf16`, or None where no build runs here."""
    return _runnable(SPLIT)


def chunk_kernel() -> Kernel | None:
    """The chunked form `gated_delta_chunk_bf16`, or None where no build runs here."""
    return _runnable(CHUNK)


def supports_split(qkvz: torch.Tensor, ba: torch.Tensor) -> bool:
    """qkvz `[B, T, Hk * (2 Dk + 2 g Dv)]` and ba `[B, T, Hk * 2 g]`: bf16 on CPU, unit stride along the
    last dim and rows addressable by one stride."""
    return (
        qkvz.device.type == "cpu"
        and qkvz.dtype == ba.dtype == torch.bfloat16
        and qkvz.dim() == ba.dim() == 3
        and qkvz.stride(-1) == ba.stride(-1) == 1
        and qkvz.stride(0) == qkvz.shape[1] * qkvz.stride(1)
        and ba.stride(0) == ba.shape[1] * ba.stride(1)
        and split_kernel() is not None
    )


def split_projections(qkvz: torch.Tensor, ba: torch.Tensor, key_heads: int, key_dim: int, value_heads: int,
                      value_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grouped projections (see `supports_split`) as qkv `[B, T, C]`, z `[B, T, HV, V]`, b and a
    `[B, T, HV]`, all contiguous: the copies `GatedDeltaNet._split_projections` makes, in one pass."""
    batch, length = qkvz.shape[:2]
    channels = 2 * key_heads * key_dim + value_heads * value_dim
    qkv = torch.empty(batch, length, channels, dtype=qkvz.dtype)
    z = torch.empty(batch, length, value_heads, value_dim, dtype=qkvz.dtype)
    b = torch.empty(batch, length, value_heads, dtype=qkvz.dtype)
    a = torch.empty(batch, length, value_heads, dtype=qkvz.dtype)
    flat_qkvz, flat_ba = qkvz.reshape(-1, qkvz.shape[-1]), ba.reshape(-1, ba.shape[-1])
    split_kernel()(flat_qkvz.data_ptr(), flat_qkvz.stride(0), flat_ba.data_ptr(), flat_ba.stride(0), batch * length,
                   key_heads, value_heads, key_dim, value_dim, qkv.data_ptr(), z.data_ptr(), b.data_ptr(), a.data_ptr(),
                   torch.get_num_threads())
    return qkv, z, b, a


def supports(mixed: torch.Tensor, conv_state: torch.Tensor, recurrent: torch.Tensor, value_dim: int) -> bool:
    """mixed `[B, T, C]` bf16 on CPU with T <= FEW_TOKENS, a bf16 conv tail and an fp32 state."""
    return (
        mixed.device.type == "cpu"
        and mixed.dtype == conv_state.dtype == torch.bfloat16
        and recurrent.dtype == torch.float32
        and 0 < mixed.shape[1] <= FEW_TOKENS
        and value_dim % DIM_MULTIPLE == 0
        and kernel() is not None
    )


def gated_delta_step(mixed: torch.Tensor, conv_state: torch.Tensor, conv_weight: torch.Tensor, a: torch.Tensor,
                     b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, recurrent: torch.Tensor,
                     key_heads: int, key_dim: int, value_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixed `[B, T, C]` (q | k | v before the conv), conv_state `[B, C, W-1]`, conv_weight `[C, W]`,
    a, b `[B, T, HV]`, recurrent `[B, HV, K, V]` fp32 -> (out `[B, T, HV, V]`, conv_state, recurrent).

    The returned states are the inputs updated in place when those were contiguous, else
    contiguous copies (the caller stores what is returned)."""
    batch, length, _ = mixed.shape
    heads = a.shape[-1]
    mixed, a, b = mixed.contiguous(), a.contiguous(), b.contiguous()
    conv_state, recurrent = conv_state.contiguous(), recurrent.contiguous()
    conv_weight = conv_weight.contiguous()
    decay_rate = A_log.float().exp().contiguous()
    bias = dt_bias.float().contiguous()
    out = torch.empty(batch, length, heads, value_dim, dtype=mixed.dtype)
    for i in range(batch):
        status = kernel()(mixed[i].data_ptr(), length, key_heads, heads, key_dim, value_dim, conv_state[i].data_ptr(),
                          conv_weight.data_ptr(), conv_weight.shape[-1], a[i].data_ptr(), b[i].data_ptr(),
                          decay_rate.data_ptr(), bias.data_ptr(), recurrent[i].data_ptr(), out[i].data_ptr(),
                          torch.get_num_threads())
        if status != 0:
            raise MemoryError("delta rule work buffers could not be allocated")
    return out, conv_state, recurrent


def supports_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int, use_qk_l2norm: bool) -> bool:
    """q, k `[B, T, H, K]` and v `[B, T, HV, V]` bf16 on CPU, unit stride along the head dims, q and k
    laid out alike, K and V multiples of 16, L2-normalised q/k and a chunk of at most MAX_CHUNK."""
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.bfloat16
        and use_qk_l2norm
        and 0 < chunk_size <= MAX_CHUNK
        and q.shape[-1] % DIM_MULTIPLE == 0
        and v.shape[-1] % DIM_MULTIPLE == 0
        and q.stride() == k.stride()
        and q.stride(-1) == v.stride(-1) == 1
        and chunk_kernel() is not None
    )


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                           *, scale: float | None = None, initial_state: torch.Tensor | None = None,
                           output_final_state: bool = True, chunk_size: int = CHUNK_SIZE,
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The contract of `chunk.chunk_gated_delta_rule` with use_qk_l2norm, for inputs `supports_chunk` takes.

    q, k `[B, T, H, K]`; v `[B, T, HV, V]`; g, beta `[B, T, HV]`; initial_state `[B, HV, K, V]`.
    Returns o `[B, T, HV, V]` bf16 and the final state `[B, HV, K, V]` fp32 (or None)."""
    batch, length, key_heads, key_dim = q.shape
    heads, value_dim = v.shape[2], v.shape[3]
    if scale is None:
        scale = key_dim**-0.5
    if initial_state is None:
        state = torch.zeros(batch, heads, key_dim, value_dim, dtype=torch.float32)
    else:
        state = initial_state.to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
    g32 = g.to(torch.float32).contiguous()
    beta32 = beta.to(torch.float32).contiguous()
    out = torch.empty(batch, length, heads, value_dim, dtype=v.dtype)
    for i in range(batch):
        status = chunk_kernel()(
            q[i].data_ptr(), k[i].data_ptr(), q.stride(1), q.stride(2), v[i].data_ptr(), v.stride(1), v.stride(2),
            g32[i].data_ptr(), beta32[i].data_ptr(), length, key_heads, heads, key_dim, value_dim, scale, chunk_size,
            state[i].data_ptr(), out[i].data_ptr(), out.stride(1), out.stride(2), torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("delta rule work buffers could not be allocated")
    return out, (state if output_final_state else None)


def gated_delta_step_grouped(qkvz: torch.Tensor, ba: torch.Tensor, conv_state: torch.Tensor,
                             conv_weight: torch.Tensor, decay_rate: torch.Tensor, dt_bias: torch.Tensor,
                             recurrent: torch.Tensor, key_heads: int, key_dim: int, value_dim: int,
                             out: torch.Tensor) -> None:
    """`gated_delta_step` for one sequence on the input projections as the checkpoint groups them per key
    head: qkvz `[T, Hk * (2 Dk + 2 g Dv)]` and ba `[T, Hk * 2 g]` (unit stride along the last dim).
    conv_state `[C, W-1]` bf16 and recurrent `[HV, K, V]` fp32, both contiguous, are updated in place;
    decay_rate = exp(A_log) and dt_bias `[HV]` fp32; writes out `[T, HV, V]` (contiguous bf16).
    The caller checks `grouped_kernel()` is not None."""
    length, heads = qkvz.shape[0], recurrent.shape[0]
    status = grouped_kernel()(qkvz.data_ptr(), qkvz.stride(0), ba.data_ptr(), ba.stride(0), length, key_heads, heads,
                              key_dim, value_dim, conv_state.data_ptr(), conv_weight.data_ptr(), conv_weight.shape[-1],
                              decay_rate.data_ptr(), dt_bias.data_ptr(), recurrent.data_ptr(), out.data_ptr(),
                              torch.get_num_threads())
    if status != 0:
        raise MemoryError("delta rule work buffers could not be allocated")
