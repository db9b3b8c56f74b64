"""ctypes binding of `delta_step_bf16.c`: conv update, gates and delta rule for a few bf16 tokens."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from ..native import load

MAX_TOKENS = 16
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = (_PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, ctypes.c_int)


@functools.cache
def kernel():
    """The C function `gated_delta_step_bf16`, or None where it cannot run here."""
    entry = load(Path(__file__).with_name("delta_step_bf16.c"), "gated_delta_step_bf16", _ARGTYPES)
    if entry is not None:
        entry.restype = ctypes.c_int
    return entry


def supports(mixed: torch.Tensor, conv_state: torch.Tensor, recurrent: torch.Tensor, value_dim: int) -> bool:
    """mixed `[B, T, C]` bf16 on CPU with T <= MAX_TOKENS, a bf16 conv tail and an fp32 state."""
    return (
        mixed.device.type == "cpu"
        and mixed.dtype == conv_state.dtype == torch.bfloat16
        and recurrent.dtype == torch.float32
        and 0 < mixed.shape[1] <= MAX_TOKENS
        and value_dim % 16 == 0
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
