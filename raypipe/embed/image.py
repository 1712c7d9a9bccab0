"""Image embedder: a transformers ResNet (default ResNet34, pooled 512-d), no Ray here.

Loading (all through ``from_pretrained`` or ``ResNetConfig``):
- ``weights: pretrained`` + ``model: microsoft/resnet-34`` (hub name) or a local directory;
- ``weights: random``: ResNet34 architecture from ``ResNetConfig`` with seeded weights
  (offline demo and tests).

Channels: records are (C, H, W) in [0, 1]. C = 1 is repeated to 3; C = 3 is used as is;
C > 3 (multispectral) is mapped to 3 channels by ``band_projection`` -- never truncated:
``mean_groups`` averages three contiguous band groups (e.g. 6 bands -> (1,2), (3,4), (5,6)),
``select`` takes ``band_indices`` (explicit choice), ``pca`` projects each image on its
first three principal components (sign fixed). Then ImageNet normalisation.
"""

from __future__ import annotations

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET34 = dict(layer_type="basic", depths=[3, 4, 6, 3], hidden_sizes=[64, 128, 256, 512], embedding_size=64)


def load_image_model(model: str, weights: str = "pretrained", revision: str | None = None, seed: int = 0):
    """A ``ResNetModel`` from a hub name / directory, or seeded random ResNet34 weights."""
    from transformers import ResNetConfig, ResNetModel

    if weights == "random":
        torch.manual_seed(seed)
        return ResNetModel(ResNetConfig(**RESNET34)).eval()
    return ResNetModel.from_pretrained(model, revision=revision).eval()


def to_three_channels(x: np.ndarray, projection: str = "mean_groups", band_indices=None) -> np.ndarray:
    """(B, C, H, W) -> (B, 3, H, W) by the documented rule for C = 1, 3 or > 3."""
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
        return x[:, list(band_indices)]
    if projection == "mean_groups":
        groups = np.array_split(np.arange(c), 3)
        return np.stack([x[:, g].mean(axis=1) for g in groups], axis=1)
    if projection == "pca":
        out = np.empty((x.shape[0], 3) + x.shape[2:], np.float32)
        for i, img in enumerate(x):
            flat = img.reshape(c, -1).T
            centred = flat - flat.mean(0)
            _, _, vt = np.linalg.svd(centred, full_matrices=False)
            comps = vt[:3] * np.sign(vt[:3].sum(axis=1, keepdims=True) + 1e-12)
            proj = centred @ comps.T
            lo, hi = proj.min(0), proj.max(0)
            out[i] = ((proj - lo) / np.where(hi > lo, hi - lo, 1)).T.reshape((3,) + x.shape[2:])
        return out
    raise ValueError(f"unknown band_projection {projection!r} (mean_groups, select, pca)")


class ImageEmbedder:
    """Callable: (B, C, H, W) float arrays in [0, 1] -> (B, 512) float32 pooled embeddings."""

    def __init__(self, model: str = "microsoft/resnet-34", weights: str = "pretrained", revision: str | None = None,
                 input_size: int = 224, band_projection: str = "mean_groups", band_indices=None, seed: int = 0,
                 device: str | None = None, precision: str = "auto"):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_image_model(model, weights, revision, seed).to(self.device)
        self.input_size, self.projection, self.band_indices = input_size, band_projection, band_indices
        self.dtype = None
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
            if precision in ("auto", "bf16"):
                self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            elif precision == "fp16":
                self.dtype = torch.float16
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self.dim = int(self.model.config.hidden_sizes[-1])

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(to_three_channels(images, self.projection, self.band_indices),
                                                  dtype=np.float32)).to(self.device)
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = torch.nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                                antialias=True, align_corners=False)
        x = (x - self.mean) / self.std
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            pooled = self.model(pixel_values=x).pooler_output
        return pooled.flatten(1).float().cpu().numpy()
