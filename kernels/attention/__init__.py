"""Causal grouped-query attention over a K/V cache."""

from .blocked import causal_attention
from .naive import naive_causal_attention

__all__ = ["causal_attention", "naive_causal_attention"]
