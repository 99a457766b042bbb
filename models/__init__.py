"""Inception v3 and Xception, their registry, weights loading and preprocessing.

``create_model``, ``list_models``, ``resolve_arch`` and ``model_spec`` are the way in; each
architecture's spec carries its preprocessing and capabilities, which data loading, the
demo and export read instead of repeating constants.
"""
from .errors import UserError
from .inception_v3 import InceptionOutputs, InceptionV3
from .preprocess import Normalizer, PreprocessConfig
from .registry import (ModelSpec, UnknownArchError, create_model, list_models, model_spec, preprocess_config,
                       resolve_arch)
from .weights import WeightsError, load_weights
from .xception import Xception

__all__ = [
    "InceptionOutputs",
    "InceptionV3",
    "ModelSpec",
    "Normalizer",
    "PreprocessConfig",
    "UnknownArchError",
    "UserError",
    "WeightsError",
    "Xception",
    "create_model",
    "list_models",
    "load_weights",
    "model_spec",
    "preprocess_config",
    "resolve_arch",
]
