"""One registry of fusion methods, keyed by name (fusilli-style metadata on each method).

``build_method("omnifuse", specs, task, n_outputs, train_cfg)`` builds any method
from the training config: ``hidden_dim`` for every method, ``train.omnifuse.*``
for OmniFuse, ``train.method_args`` for a method's own knobs (e.g.
``{"rho": 0.5}`` for metafusion, ``{"lambda_mi": 0.2}`` for ddf, ``{"latent_dim": 16}``
for mvae, ``{"gate": "constant"}`` for hybrid, ``{"layers": 3}`` for graph).
"""

from __future__ import annotations

import inspect
from typing import Sequence

from raypipe.fusion.base import FusionMethod, MethodInfo, ModalitySpec
from raypipe.fusion.baselines import BASELINES
from raypipe.fusion.graph import GraphFusion
from raypipe.fusion.hybrid import HybridFusion
from raypipe.fusion.mvae import MVAE
from raypipe.fusion.omnifuse import OmniFuse

#: the survey's families beyond early/late/attention (docs/fusion.md): hybrid, graph-based, generative (VAE)
FAMILIES: dict[str, type[FusionMethod]] = {"hybrid": HybridFusion, "graph": GraphFusion, "mvae": MVAE}

REGISTRY: dict[str, type[FusionMethod]] = {"omnifuse": OmniFuse, **BASELINES, **FAMILIES}


def list_methods(task: str | None = None, fusion_type: str | None = None) -> list[MethodInfo]:
    """Metadata of the registered methods, optionally filtered by task and fusion type."""
    infos = [cls.info for cls in REGISTRY.values()]
    if task is not None:
        infos = [i for i in infos if task in i.tasks]
    if fusion_type is not None:
        infos = [i for i in infos if i.fusion_type == fusion_type]
    return infos


def build_method(name: str, specs: Sequence[ModalitySpec], task: str, n_outputs: int, train_cfg=None) -> FusionMethod:
    """Instantiate method ``name`` for these modalities and task from a ``TrainConfig``."""
    from raypipe.config import TrainConfig

    if name not in REGISTRY:
        raise ValueError(f"unknown fusion method {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    cfg = train_cfg or TrainConfig()
    cls = REGISTRY[name]
    kwargs = {"hidden_dim": cfg.hidden_dim}
    if name == "omnifuse":
        kwargs.update(cfg.omnifuse.model_dump())
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "specs", "task", "n_outputs"}
    unknown = set(cfg.method_args) - accepted
    if unknown:
        raise ValueError(f"train.method_args {sorted(unknown)} not accepted by {name!r} (accepts {sorted(accepted)})")
    kwargs.update(cfg.method_args)
    return cls(list(specs), task, n_outputs, **kwargs)
