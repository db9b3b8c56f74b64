"""Self-contained Qwen3-Next runtime (also running the Qwen3.5 / Qwen3.6 families): config, layers, state,
loader, generation."""

from .config import ConfigError, ModelConfig
from .generation import Generation, GenerationResult, GenerationSettings, PrefillProgress, TextDelta, prefill
from .loader import LoadError, default_dtype, load_model
from .qwen3_next import LanguageModel
from .sampling import Sampler, SamplingParams
from .state import ModelState, StateError

__all__ = [
    "ConfigError", "Generation", "GenerationResult", "GenerationSettings", "LanguageModel", "LoadError",
    "ModelConfig", "ModelState", "PrefillProgress", "Sampler", "SamplingParams", "StateError", "TextDelta",
    "default_dtype", "load_model", "prefill",
]
