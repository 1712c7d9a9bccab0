"""Embedding-sized views of the synthetic cohort's latent observations (no images needed).

For method studies (benchmarks/fusion_quality.py) and fast tests of the training
stage: each modality's 8-d observation ``obs_m`` from ``truth.parquet`` is mapped
to a ``dim``-d "foundation-model embedding" by a fixed, seeded random two-layer
map (linear -> tanh -> linear, plus small isotropic noise), so the encoders
face embedding-like inputs whose information content is exactly the
observation's. Missing modalities follow ``avail_<m>``.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raypipe.schema import embedding_column, embeddings_schema, mask_column, row_group_rows
from raypipe.synth.latent import MODALITIES


def render_embeddings(truth: pd.DataFrame, dim: int = 64, seed: int = 7, noise: float = 0.05) -> dict[str, np.ndarray]:
    """{modality: (N, dim) float32} from the truth table's ``obs_<m>`` columns."""
    out = {}
    for j, m in enumerate(MODALITIES):
        obs = np.stack(truth[f"obs_{m}"].to_numpy()).astype(np.float64)
        rng = np.random.default_rng([seed, j])
        w1 = rng.standard_normal((obs.shape[1], 2 * dim)) / np.sqrt(obs.shape[1])
        w2 = rng.standard_normal((2 * dim, dim)) / np.sqrt(2 * dim)
        emb = np.tanh(obs @ w1) @ w2
        emb += noise * np.random.default_rng([seed, j, 1]).standard_normal(emb.shape)
        out[m] = emb.astype(np.float32)
    return out


def write_truth_embeddings(truth: pd.DataFrame, out_dir: str, dim: int = 64, seed: int = 7,
                           test_fraction: float = 0.2) -> str:
    """Write an embeddings table (the embed stage's format) from a truth table; returns ``out_dir``."""
    from raypipe.train.splits import holdout_mask

    emb = render_embeddings(truth, dim, seed)
    ids = truth["sample_id"].astype(str).to_numpy()
    test = holdout_mask(ids, truth["label"].to_numpy(), fraction=test_fraction, seed=seed)
    groups = ["site", "sex"]
    schema = embeddings_schema({m: (dim,) for m in MODALITIES}, ["label"], groups + ["split"],
                               spec={"source": "synthetic latent observations", "dim": dim, "seed": seed})
    cols: dict = {"sample_id": ids, "label": truth["label"].astype(float).to_numpy(),
                  "site": ("site" + truth["site"].astype(str)).to_numpy(), "sex": truth["sex"].astype(str).to_numpy(),
                  "split": np.where(test, "test", "train")}
    for m in MODALITIES:
        avail = truth[f"avail_{m}"].to_numpy().astype(bool)
        values = pa.array(emb[m].ravel())
        cols[embedding_column(m)] = pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~avail))
        cols[mask_column(m)] = avail
    table = pa.table(cols, schema=schema).sort_by("sample_id")
    os.makedirs(out_dir, exist_ok=True)
    pq.write_table(table, os.path.join(out_dir, "part-00000.parquet"),
                   row_group_size=row_group_rows(table))  # parallel reads (raypipe.schema.ROW_GROUP_BYTES)
    return out_dir
