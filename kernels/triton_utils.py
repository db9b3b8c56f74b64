"""Helpers shared by the Triton kernels.

Importing this module does not import Triton: the CPU runtime must not pay for (or depend on) it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from torch import Tensor

# Largest head dim the kernels keep whole in one block (q/k rows are L2-normalised in registers).
MAX_HEAD_DIM = 256


@cache
def triton_importable() -> bool:
    """Whether `import triton` succeeds (checked once; a broken install counts as absent)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # any failure (missing libs, bad wheel) must send callers to the PyTorch path
        return False
    return True


def use_triton(x: Tensor) -> bool:
    """Dispatch rule of every op: Triton for CUDA tensors when Triton imports, PyTorch otherwise."""
    return x.is_cuda and triton_importable()


def interpreting() -> bool:
    """Whether Triton kernels run under the CPU interpreter (`TRITON_INTERPRET=1`), as Triton reads it."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def block_size(n: int, minimum: int = 16) -> int:
    """Power-of-two block covering n; at least 16, the smallest `tl.dot` operand side."""
    return max(minimum, next_power_of_2(n))


def tl_dtype(dtype: torch.dtype) -> Any:
    """The `triton.language` dtype for a torch floating dtype."""
    import triton.language as tl

    table = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    if dtype not in table:
        raise TypeError(f"unsupported dtype {dtype}; expected float32, bfloat16 or float16")
    return table[dtype]


def mma_dtype(dtype: torch.dtype) -> Any:
    """Operand dtype for `tl.dot` on tensors stored in `dtype`.

    On GPU, half-precision operands feed the tensor cores as they are (products accumulate in
    fp32). Under the interpreter they are widened to fp32 first, which is exact, because its
    `tl.dot` multiplies the raw bit patterns of bf16 operands (triton-lang/triton#11584).
    """
    import triton.language as tl

    if interpreting() or dtype == torch.float32:
        return tl.float32
    return tl_dtype(dtype)


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision for fp32 operands derived from inputs of `dtype`.

    TF32 keeps bf16 and fp16 values exact and gives fp32 intermediates 10 mantissa bits, finer
    than those inputs; fp32 inputs get exact IEEE products.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def check_head_dim(name: str, dim: int) -> None:
    if dim > MAX_HEAD_DIM:
        raise ValueError(f"{name} = {dim} exceeds {MAX_HEAD_DIM}, the largest head dim kept in one block")
