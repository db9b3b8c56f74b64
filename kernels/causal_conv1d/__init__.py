"""Causal depthwise convolution (the short conv in front of the Gated DeltaNet q, k, v)."""

from .conv import causal_conv1d, causal_conv1d_update

__all__ = ["causal_conv1d", "causal_conv1d_update"]
