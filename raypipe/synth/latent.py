"""The generative model behind the synthetic clinical cohort (docs/synthetic.md).

Every patient has three independent latent factors ``u_dom, u_weak, u_lazy ~ N(0, 1)``
and a binary label drawn from ``sigmoid(2 u_dom + 1 u_weak + 1 u_lazy + b)``.
Each modality observes one factor through an ``obs_dim``-dimensional noisy view
(latent times a fixed unit direction, plus noise):

=========  ===========  ==========================================================
modality   observes     role
=========  ===========  ==========================================================
ct         u_dom        dominant: low noise
pet        u_dom        partly redundant with ct: same factor, more noise
ehr        u_weak       informative but weaker
report     u_lazy       *lazy*: low noise at site 0, but heavy-tailed
                        (Student-t) noise at the other sites, so the signal is
                        buried for part of the cohort
=========  ===========  ==========================================================

A model that treats every site's report as equally reliable is hurt by the
heavy-tailed sites; a plain logistic regression on all modalities concatenated
then scores *below* the dominant modality alone -- the laziness/imbalance
phenomenon OmniFuse targets. The Bayes reference is the AUROC of the true
probability ``sigmoid(logit)``, computed from the latents.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

MODALITIES = ("ct", "pet", "ehr", "report")


@dataclass(frozen=True)
class ClinicalParams:
    """Generating parameters; written verbatim into ``truth.json``."""

    coef_dom: float = 2.0
    coef_weak: float = 1.0
    coef_lazy: float = 1.0
    intercept: float = -0.5
    obs_dim: int = 8
    noise_ct: float = 0.35
    noise_pet: float = 0.9
    noise_ehr: float = 0.6
    noise_report_clean: float = 0.4  # site 0
    noise_report_df: float = 2.0  # Student-t degrees of freedom at the noisy sites
    noise_report_scale: float = 3.0
    clean_sites: tuple[int, ...] = (0,)
    direction_seed: int = 1234  # fixed observation directions (same for every cohort)
    missing_rate: dict = field(default_factory=lambda: {"ct": 0.1, "pet": 0.3, "ehr": 0.15, "report": 0.2})
    mnar: dict = field(default_factory=lambda: {"pet": 0.5})

    def to_json(self) -> dict:
        d = asdict(self)
        d["clean_sites"] = list(self.clean_sites)
        return d


def observation_directions(params: ClinicalParams) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(params.direction_seed)
    dirs = rng.standard_normal((len(MODALITIES), params.obs_dim))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return {m: dirs[i] for i, m in enumerate(MODALITIES)}


def _availability(rng: np.random.Generator, logit: np.ndarray, params: ClinicalParams) -> dict[str, np.ndarray]:
    n = len(logit)
    risk = 1.0 / (1.0 + np.exp(-logit))
    avail = {}
    for m in MODALITIES:
        rate = float(params.missing_rate.get(m, 0.0))
        strength = float(params.mnar.get(m, 0.0))
        # MNAR: low-risk patients lack the modality more often (e.g. PET ordered on suspicion);
        # the multiplier averages ~1 so the overall rate stays near `rate`.
        p_miss = np.clip(rate * (1.0 + strength * 2.0 * (0.5 - risk)), 0.0, 1.0)
        avail[m] = rng.random(n) >= p_miss
    # Every patient keeps at least one modality: restore ct where all are missing.
    none = ~np.any(np.stack([avail[m] for m in MODALITIES]), axis=0)
    avail["ct"] = avail["ct"] | none
    return avail


def generate_truth(n: int = 200, seed: int = 0, sites: int = 3, params: ClinicalParams | None = None) -> pd.DataFrame:
    """Draw ``n`` patients: latents, label, site, sex, age, per-modality observations, availability.

    Deterministic in ``seed``. Columns: sample_id, patient_id, site, sex, age, u_dom, u_weak,
    u_lazy, logit, prob, label, obs_<m> (float32 arrays of ``obs_dim``), avail_<m> (bool).
    ``sample_id`` is the cohort-local case key ("case_0007"); ``patient_id`` is the
    fake medical record number that the files carry (PHI for the de-identification tests).
    """
    params = params or ClinicalParams()
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((n, 3))
    site = rng.integers(0, sites, n)
    logit = params.coef_dom * u[:, 0] + params.coef_weak * u[:, 1] + params.coef_lazy * u[:, 2] + params.intercept
    prob = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(n) < prob).astype(np.int64)
    sex = np.where(rng.random(n) < 0.5, "F", "M")
    age = np.clip(np.round(64 + 6 * u[:, 1] + 9 * rng.standard_normal(n)), 18, 99).astype(np.int64)

    dirs = observation_directions(params)
    d = params.obs_dim
    obs = {
        "ct": u[:, [0]] * dirs["ct"] + params.noise_ct * rng.standard_normal((n, d)),
        "pet": u[:, [0]] * dirs["pet"] + params.noise_pet * rng.standard_normal((n, d)),
        "ehr": u[:, [1]] * dirs["ehr"] + params.noise_ehr * rng.standard_normal((n, d)),
    }
    noise = params.noise_report_clean * rng.standard_normal((n, d))
    noisy = ~np.isin(site, params.clean_sites)
    noise[noisy] = params.noise_report_scale * rng.standard_t(params.noise_report_df, (int(noisy.sum()), d))
    obs["report"] = u[:, [2]] * dirs["report"] + noise
    avail = _availability(rng, logit, params)

    df = pd.DataFrame({
        "sample_id": [f"case_{i:05d}" for i in range(n)],
        "patient_id": [f"MRN{7000000 + int(x):07d}" for x in rng.choice(2_000_000, n, replace=False)],
        "site": site.astype(np.int64),
        "sex": sex,
        "age": age,
        "u_dom": u[:, 0], "u_weak": u[:, 1], "u_lazy": u[:, 2],
        "logit": logit, "prob": prob, "label": label,
    })
    for m in MODALITIES:
        df[f"obs_{m}"] = list(obs[m].astype(np.float32))
        df[f"avail_{m}"] = avail[m]
    return df


def bayes_auroc(truth: pd.DataFrame) -> float:
    """AUROC of the true probability: the best any model could do in expectation."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(truth["label"], truth["prob"]))
