"""Weights held quantized (official FP8 blocks, int8 per channel, int4 per group) and the linear
layer over them. Layouts are in `formats.py`; `reference.py` is the exact definition."""

from .formats import FORMATS, FP8_BLOCK, INT4, INT4_GROUP_SIZE, INT8, QuantizedRows, QuantizedWeight
from .reference import dequantize, fp8_block, pack_int4, quantize_int4, quantize_int8, quantized_linear, unpack_int4

__all__ = [
    "FORMATS",
    "FP8_BLOCK",
    "INT4",
    "INT4_GROUP_SIZE",
    "INT8",
    "QuantizedRows",
    "QuantizedWeight",
    "dequantize",
    "fp8_block",
    "pack_int4",
    "quantize_int4",
    "quantize_int8",
    "quantized_linear",
    "unpack_int4",
]
