"""Shared setup of the Triton kernel tests (`tests/test_triton_*.py`).

Each test module sets `TRITON_INTERPRET` (default "1") before importing this module; the kernel
modules are imported afterwards, through `load`, so their `@triton.jit` kernels are built for
the interpreter and run on CPU tensors. With `TRITON_INTERPRET=0` on a CUDA machine the same
tests run the compiled kernels on the GPU.

Two fixes make the interpreter behave like a GPU, applied only while interpreting:

* Triton may already be imported when a test module sets the variable (transformers imports it),
  and then its library functions (`tl.sum`, `tl.cumsum`, ...) are compiled-mode objects that
  refuse to run; calls to them are routed to the interpreter instead.
* The interpreter truncates float32 -> bfloat16 conversions (its round-to-nearest mode does not
  carry into the exponent) where GPUs round to nearest even; the tests compare bf16 results at
  one-rounding precision, so conversions get the GPU's rounding.
"""

from __future__ import annotations

import importlib
import inspect
from types import ModuleType

import numpy as np
import pytest
import torch

from kernels.triton_utils import interpreting, triton_importable

HAVE_TRITON = triton_importable()
NO_TRITON = "Triton is not importable: the Triton kernels cannot be tested"
NO_GPU = "TRITON_INTERPRET=0 and no CUDA device: compiled Triton kernels need a GPU"

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: checks that CUDA tensors dispatch to Triton"
)


INTERPRET = HAVE_TRITON and interpreting()
DEVICE = torch.device("cpu" if INTERPRET or not torch.cuda.is_available() else "cuda")


def _route_library_jit_calls_to_interpreter() -> None:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def call(self, *args, **kwargs):
        interpreted = self.__dict__.get("_interpreted")
        if interpreted is None:
            interpreted = self._interpreted = InterpretedFunction(self.fn)
        return interpreted(*args, **kwargs)

    JITFunction.__call__ = call


def _round_bf16_to_nearest_even() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float

    def convert(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            values = np.ascontiguousarray(data, dtype=np.float32)
            bits = values.view(np.uint32)
            rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(values)
            rounded[nan] = (bits[nan] >> 16).astype(np.uint16) | np.uint16(0x40)  # stay a (quiet) NaN
            return rounded.reshape(np.shape(data))
        return original(data, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert


if INTERPRET:
    _route_library_jit_calls_to_interpreter()
    _round_bf16_to_nearest_even()


def load(module: str) -> ModuleType:
    """Import a Triton kernel module, or skip the calling test with the reason it cannot run."""
    if not HAVE_TRITON:
        pytest.skip(NO_TRITON)
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip(NO_GPU)
    return importlib.import_module(module)


def jit_kernels(module: ModuleType) -> dict[str, object]:
    """The `@triton.jit` objects defined in a kernel module, by name."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return {
        name: obj
        for name, obj in inspect.getmembers(module)
        if isinstance(obj, JITFunction | InterpretedFunction) and obj.fn.__module__ == module.__name__
    }


def check_interpreted(module: ModuleType) -> None:
    """Every kernel of `module` is built for the interpreter exactly when TRITON_INTERPRET asks for it."""
    from triton.runtime.interpreter import InterpretedFunction

    kernels = jit_kernels(module)
    assert kernels, f"no @triton.jit kernels found in {module.__name__}"
    for name, kernel in kernels.items():
        assert isinstance(kernel, InterpretedFunction) == INTERPRET, f"{module.__name__}.{name}: {type(kernel)}"


def prefill_new_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `torch.empty` / `torch.empty_like` return NaN-filled float tensors (-1 for integers).

    The kernels allocate their outputs and intermediates with these, so any element a kernel
    fails to write shows up as NaN (or a bad index) in the comparison with the reference.
    """
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t.fill_(float("nan"))
        if t.dtype != torch.bool:
            return t.fill_(-1)
        return t

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: fill(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: fill(empty_like(*args, **kwargs)))


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
