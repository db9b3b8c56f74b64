"""RMS norms: zero-centred block norm and the SiLU-gated Gated DeltaNet output norm."""

from .norm import gated_rms_norm, rms_norm

__all__ = ["gated_rms_norm", "rms_norm"]
