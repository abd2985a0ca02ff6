"""JAX decoder-only language models: config, parameters, forward pass with captures, loading."""

from clt.lm.config import ModelConfig
from clt.lm.generate import GenerateConfig, generate
from clt.lm.loading import EMBEDDED, LoadedModel, ModelNotFound, list_models, load_model
from clt.lm.model import (
    ALL,
    FREEZABLE,
    SUBSTITUTABLE,
    Capture,
    InputError,
    MLPHook,
    forward,
    forward_cached,
    init_cache,
)
from clt.lm.params import LayerParams, LMParams, WeightsError, cast_params, random_params
from clt.lm.tokenizer import Tokenizer

__all__ = [
    "ALL", "EMBEDDED", "FREEZABLE", "Capture", "GenerateConfig", "InputError", "LMParams",
    "LayerParams", "LoadedModel", "MLPHook", "ModelConfig", "ModelNotFound", "SUBSTITUTABLE",
    "Tokenizer", "WeightsError",
    "cast_params", "forward", "forward_cached", "generate", "init_cache", "list_models",
    "load_model", "random_params",
]
