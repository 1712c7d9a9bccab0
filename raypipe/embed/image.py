"""Image embedder: a transformers ResNet (default ResNet34, pooled 512-d). No Ray here.

Loading (:func:`load_image_model`), one code path for every source:
- ``weights: pretrained`` + ``model``: a hub name (default ``microsoft/resnet-34``)
  or a local directory (e.g. one written by ``save_pretrained``), both through
  ``ResNetModel.from_pretrained``;
- ``weights: random``: the ResNet34 architecture from ``ResNetConfig(layer_type="basic",
  depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 256, 512])`` with weights drawn from a
  fixed seed (offline demo and tests). The global torch RNG is left untouched.

Channels (:func:`to_three_channels`): records are (C, H, W) float32 in [0, 1].
C = 1 is repeated to 3; C = 3 is used as is; C = 2 gets its mean as a third
channel; C > 3 (multispectral) is mapped to 3 channels by ``band_projection`` and
never silently truncated:

- ``mean_groups`` (default): a fixed 1x1 projection that averages three
  contiguous band groups (6 bands -> (0,1), (2,3), (4,5)); every band contributes;
- ``select``: the three bands in ``band_indices`` (an explicit, documented choice,
  e.g. red/green/blue of a Sentinel-2 stack);
- ``pca``: each image projected on its own first three principal components
  (sign-fixed, min-max scaled to [0, 1]).

Then the image is resized to ``input_size`` (bilinear, antialiased) if the record
differs, and ImageNet-normalised. :meth:`ImageEmbedder.preprocess` is the CPU stage of
the Ray pipeline: channels and resize, leaving values in [0, 1] and single-channel
images single-channel; :meth:`ImageEmbedder.embed_pixels` is the model stage: it
repeats one channel to three and normalises on the model's device. On a GPU that moves
a third of the bytes through the object store and over PCIe, and takes the
normalisation arithmetic off the CPUs that feed it. (The arithmetic is the same as
:func:`preprocess_images` with ``normalize=True``: float32 subtract, then divide.)

Determinism: CPU convolutions give last-bit differences for different batch
sizes, so the model always runs on micro-batches of exactly ``fixed_batch`` rows
(the tail padded and dropped). The same slice then gets the same bytes whatever
batch Ray Data happens to put it in, across runs, pool sizes and resumed runs.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import numpy as np

# torch/transformers are imported where they are used: the CPU decode tasks only need
# numpy (and torch only to resize), which keeps their worker start-up short.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ResNet34 as transformers describes it (same as microsoft/resnet-34's config.json).
RESNET34 = dict(layer_type="basic", depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 256, 512], embedding_size=64)
#: Name recorded in the embedding spec for seeded random weights.
RANDOM_MODEL_NAME = "resnet34-random"


def _field(spec: Any, name: str, default: Any = None) -> Any:
    if spec is None:
        return default
    if isinstance(spec, dict):
        return spec.get(name, default)
    return getattr(spec, name, default)


def load_image_model(model: Any = "microsoft/resnet-34", weights: str | None = None, revision: str | None = None,
                     seed: int = 0):
    """A ``ResNetModel`` in eval mode.

    ``model`` is a hub name, a local directory, or an ``ImageEmbed`` config (or its
    dict) whose ``model``/``weights``/``revision`` are used. ``weights="random"``
    builds ResNet34 from ``ResNetConfig`` with weights drawn from ``seed``.
    """
    import torch
    from transformers import ResNetConfig, ResNetModel

    if not isinstance(model, (str, os.PathLike)):
        cfg = model
        model, weights = _field(cfg, "model", "microsoft/resnet-34"), weights or _field(cfg, "weights", "pretrained")
        revision = revision or _field(cfg, "revision")
    weights = weights or "pretrained"
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ResNetModel(ResNetConfig(**RESNET34)).eval()
    if weights != "pretrained":
        raise ValueError(f"embed.image.weights must be 'pretrained' or 'random', got {weights!r}")
    try:
        return ResNetModel.from_pretrained(str(model), revision=revision).eval()
    except OSError as err:
        raise OSError(f"cannot load image model {model!r} (revision {revision}): {err}. Offline, point "
                      "embed.image.model at a local directory (save_pretrained) or set embed.image.weights=random"
                      ) from err


def image_model_info(image_cfg: Any) -> dict[str, Any]:
    """Embedding width and resolved revision of the configured image model, without loading weights."""
    if _field(image_cfg, "weights", "pretrained") == "random":
        return {"dim": RESNET34["hidden_sizes"][-1], "model": RANDOM_MODEL_NAME, "revision": None}
    from transformers import AutoConfig

    name, revision = str(_field(image_cfg, "model")), _field(image_cfg, "revision")
    try:
        conf = AutoConfig.from_pretrained(name, revision=revision)
    except OSError as err:
        raise OSError(f"cannot load the config of image model {name!r} (revision {revision}): {err}. Offline, point "
                      "embed.image.model at a local directory (save_pretrained) or set embed.image.weights=random"
                      ) from err
    sizes = getattr(conf, "hidden_sizes", None)
    if not sizes:
        raise ValueError(f"image model {name!r} is a {type(conf).__name__}, not a ResNet-style model with hidden_sizes")
    # a hub checkpoint's resolved commit makes "main" reproducible; local directories have none
    return {"dim": int(sizes[-1]), "model": name, "revision": revision or getattr(conf, "_commit_hash", None)}


def to_three_channels(x: np.ndarray, projection: str = "mean_groups", band_indices: Sequence[int] | None = None
                      ) -> np.ndarray:
    """(B, C, H, W) -> (B, 3, H, W) by the documented rule for C = 1, 2, 3 or > 3."""
    c = x.shape[1]
    if c == 3:
        return x
    if c == 1:
        return np.repeat(x, 3, axis=1)
    if c == 2:
        return np.concatenate([x, x.mean(axis=1, keepdims=True)], axis=1)
    if projection == "select":
        if not band_indices or len(band_indices) != 3:
            raise ValueError("band_projection=select needs embed.image.band_indices with three band indices")
        if max(band_indices) >= c or min(band_indices) < -c:
            raise ValueError(f"embed.image.band_indices {list(band_indices)} out of range for {c} bands")
        return x[:, list(band_indices)]
    if projection == "mean_groups":
        groups = np.array_split(np.arange(c), 3)
        return np.stack([x[:, g].mean(axis=1) for g in groups], axis=1)
    if projection == "pca":
        out = np.empty((x.shape[0], 3) + x.shape[2:], np.float32)
        for i, img in enumerate(x):
            flat = img.reshape(c, -1).T.astype(np.float64)
            centred = flat - flat.mean(0)
            _, _, vt = np.linalg.svd(centred, full_matrices=False)
            comps = vt[:3] * np.where(vt[:3].sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
            proj = centred @ comps.T
            lo, hi = proj.min(0), proj.max(0)
            out[i] = ((proj - lo) / np.where(hi > lo, hi - lo, 1)).T.reshape((3,) + x.shape[2:])
        return out
    raise ValueError(f"unknown band_projection {projection!r} (mean_groups, select, pca)")


def preprocess_images(images: np.ndarray | Sequence[np.ndarray], input_size: int, projection: str = "mean_groups",
                      band_indices: Sequence[int] | None = None, normalize: bool = True, keep_gray: bool = False
                      ) -> np.ndarray:
    """(B, C, H, W) in [0, 1] (or a list of same-C arrays) -> (B, 3, S, S) float32, on the CPU.

    ``normalize``: ImageNet mean/std (else values stay in [0, 1]). ``keep_gray`` (only without
    ``normalize``): a single-channel input stays (B, 1, S, S); the model stage repeats it.
    """
    x = np.asarray(images, dtype=np.float32) if not isinstance(images, np.ndarray) else images.astype(np.float32,
                                                                                                       copy=False)
    if x.ndim == 3:
        x = x[:, None]
    if not (keep_gray and not normalize and x.shape[1] == 1):
        x = to_three_channels(x, projection, band_indices)
    x = _resize(np.ascontiguousarray(x, dtype=np.float32), input_size)
    if not normalize:
        return x
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    return (x - mean) / std


def _resize(x: np.ndarray, input_size: int) -> np.ndarray:
    if x.shape[-2:] != (input_size, input_size):
        import torch

        x = torch.nn.functional.interpolate(torch.from_numpy(x), size=(input_size, input_size), mode="bilinear",
                                            antialias=True, align_corners=False).numpy()
    return x


def tensor_view(a: np.ndarray) -> "torch.Tensor":
    """``torch.from_numpy`` without the warning for read-only arrays (views of Ray's object store or of
    an Arrow buffer): the tensor is only ever read."""
    import torch

    if a.flags.writeable:
        return torch.from_numpy(a)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(a)


def autocast_dtype(device: "torch.device", precision: str) -> "torch.dtype | None":
    """Autocast dtype for ``precision`` on ``device``: bf16/fp16 on CUDA, None (fp32) on CPU or for fp32."""
    import torch

    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class ImageEmbedder:
    """Callable: (B, C, H, W) float arrays in [0, 1] -> (B, 512) float32 pooled embeddings.

    On CUDA: the model in ``channels_last``, inputs copied from pinned memory,
    bf16 (or fp16) autocast unless ``precision="fp32"``. Always ``inference_mode``.
    """

    def __init__(self, model: str = "microsoft/resnet-34", weights: str = "pretrained", revision: str | None = None,
                 input_size: int = 224, band_projection: str = "mean_groups", band_indices=None, seed: int = 0,
                 device: str | None = None, precision: str = "auto", fixed_batch: int | None = 64):
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_image_model(model, weights, revision, seed).to(self.device)
        self.input_size, self.projection, self.band_indices = input_size, band_projection, band_indices
        self.fixed_batch = fixed_batch
        self.dtype = autocast_dtype(self.device, precision)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.dim = int(self.model.config.hidden_sizes[-1])
        self._staging: dict[tuple, Any] = {}  # CUDA: one pinned host buffer per (shape, dtype), reused
        self._mean = self._std = None

    @classmethod
    def from_config(cls, image_cfg: Any, seed: int = 0, device: str | None = None, precision: str = "auto",
                    fixed_batch: int | None = 64) -> "ImageEmbedder":
        """Build from an ``ImageEmbed`` config section (or its ``model_dump()``)."""
        return cls(model=_field(image_cfg, "model"), weights=_field(image_cfg, "weights", "pretrained"),
                   revision=_field(image_cfg, "revision"), input_size=_field(image_cfg, "input_size", 224),
                   band_projection=_field(image_cfg, "band_projection", "mean_groups"),
                   band_indices=_field(image_cfg, "band_indices"), seed=seed, device=device, precision=precision,
                   fixed_batch=fixed_batch)

    def preprocess(self, images) -> np.ndarray:
        """CPU stage: channels (one stays one, else -> 3) and resize; values stay in [0, 1]."""
        return preprocess_images(images, self.input_size, self.projection, self.band_indices, normalize=False,
                                 keep_gray=True)

    def _normalise(self, x: "torch.Tensor") -> "torch.Tensor":
        """On the model's device: (B, 1 or 3, S, S) in [0, 1] -> ImageNet-normalised (B, 3, S, S) float32."""
        import torch

        if self._mean is None:
            self._mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
            self._std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise ValueError(f"model input with {x.shape[1]} channels: expected 1 or 3 (see preprocess)")
        x = (x - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x.contiguous()

    def _to_device(self, x: "torch.Tensor") -> "torch.Tensor":
        """Host batch -> GPU (same dtype; ``_normalise`` casts) via a pinned buffer allocated once per shape.

        Pinning a fresh buffer per batch (``pin_memory()``) costs a page-locking allocation each
        time, longer than the copy itself; the previous copy out of the buffer has finished before
        it is refilled, because each batch's result is read back to the host first.
        """
        import torch

        key = (tuple(x.shape), x.dtype)
        buf = self._staging.get(key)
        if buf is None:
            if len(self._staging) >= 4:  # odd shapes (a last partial batch without fixed_batch): bounded
                self._staging.clear()
            buf = self._staging[key] = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        buf.copy_(x)
        return buf.to(self.device, non_blocking=True)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Model stage: :meth:`preprocess` output, (B, 1 or 3, S, S) in [0, 1] -> (B, dim) float32."""
        import torch

        with torch.inference_mode():
            return self._embed_pixels(pixels)

    def _embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        n = len(pixels)
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        step = self.fixed_batch or n
        out = []
        for i in range(0, n, step):
            chunk = np.ascontiguousarray(pixels[i:i + step])
            if self.device.type != "cuda" or chunk.dtype != np.float16:
                chunk = chunk.astype(np.float32, copy=False)  # float16 only travels to the GPU, never computes
            k = len(chunk)
            if self.fixed_batch and k < step:  # same batch shape every call: batch-independent bytes
                chunk = np.concatenate([chunk, np.zeros((step - k,) + chunk.shape[1:], chunk.dtype)])
            x = tensor_view(chunk)
            if self.device.type == "cuda":
                x = self._to_device(x)
            x = self._normalise(x)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                pooled = self.model(pixel_values=x).pooler_output  # (B, dim, 1, 1)
            out.append(pooled.flatten(1)[:k].float().cpu().numpy())
        return np.concatenate(out)

    def __call__(self, images) -> np.ndarray:
        return self.embed_pixels(self.preprocess(images))
