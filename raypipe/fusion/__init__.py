"""Fusion methods in plain PyTorch (no Ray): encoders, OmniFuse, the baselines, one registry.

``build_method(name, specs, task, n_outputs, train_cfg)`` builds any method by name;
``list_methods()`` lists them with their metadata. See docs/fusion.md.
"""

from raypipe.fusion.base import FusionMethod, MethodInfo, ModalitySpec
from raypipe.fusion.registry import REGISTRY, build_method, list_methods

__all__ = ["FusionMethod", "MethodInfo", "ModalitySpec", "REGISTRY", "build_method", "list_methods"]
