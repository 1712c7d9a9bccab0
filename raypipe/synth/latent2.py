"""Second generative model of the synthetic clinical cohort ("v2", docs/synthetic.md).

The first model (:mod:`raypipe.synth.latent`) gives every modality its own
independent factor, so the modalities share nothing an imputation could use.
This one follows a lung-cancer work-up story instead, with the three
properties the OmniFuse paper relies on:

* **cross-modal redundancy** -- CT and PET both see the tumour burden
  ``u_tum``; the radiology report *describes the CT image* (five findings are
  the CT's own lesion readings plus reader noise) and three physiology findings
  (effusion, atelectasis, cardiomegaly) that it shares with the EHR, which
  observes the physiological reserve ``u_phys``;
* **a dominant modality that is missing often** -- PET sees the tumour burden
  *and* its metabolic activity ``u_met`` with little noise, so it is the best
  single modality; but it is ordered only when the CT looks suspicious and one
  site has no PET scanner, so it is missing for about half the cohort, and
  *not at random* (by site and by severity);
* **an informative but slow-to-fit modality** -- the EHR's outcome signal is a
  shock-index-like contrast (heart rate and respiratory rate up, blood pressure,
  SpO2 and pH down) that sits beside a four-times larger shared "sympathetic
  tone" factor (heart rate, respiratory rate, glucose *and* blood pressure up)
  which says nothing about the outcome: a gradient-trained model sees the
  nuisance first and needs many steps to find the contrast;

plus the noise OmniFuse's reliability weighting targets: one site writes
templated / copied-forward reports whose reader noise is heavy-tailed.

Label: ``y ~ Bernoulli(sigmoid(coef_tum u_tum + coef_met u_met + coef_phys u_phys + intercept))``
with ``u_tum, u_phys ~ N(0, 1)`` independent and ``u_met`` standard normal with
correlation ``rho_tum_met`` to ``u_tum`` (larger tumours tend to be more active).

The truth table has the same columns as :func:`raypipe.synth.latent.generate_truth`
(so :func:`raypipe.synth.embeddings.render_embeddings` and the file writer in
:mod:`raypipe.synth.clinical` take either), plus ``u_tum, u_met, u_phys,
u_tone`` and ``p_pet`` (the probability that PET was done). For v1-shaped
consumers ``u_dom = u_tum``, ``u_weak = u_phys`` and ``u_lazy = u_met``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

MODALITIES = ("ct", "pet", "ehr", "report")

#: Which latent factors each modality observes (the "latent of a modality" in docs/synthetic.md).
MODALITY_FACTORS = {"ct": ("u_tum",), "pet": ("u_tum", "u_met"), "ehr": ("u_phys",), "report": ("u_tum", "u_phys")}

#: Default cohort size of this generator (the size its documented properties are stated at).
DEFAULT_N = 1000

# Observation layout (8 values per modality, rendered into files by raypipe.synth.clinical):
# EHR dims drive: 0 heart rate, 1 respiratory rate, 2 glucose, 3 blood pressure (positive = lower),
# 4 temperature, 5 SpO2 (positive = lower, FiO2 higher), 6 GCS drop, 7 pH (positive = lower).
_EHR_TONE = np.array([1.0, 1.0, 1.0, -1.0, 0.5, 0.0, 0.0, 0.0])  # sympathetic tone: BP *up*
_EHR_SHOCK = np.array([1.0, 1.0, 0.5, 1.0, 0.0, 1.0, 1.0, 1.0])  # failing reserve: BP *down*, SpO2/pH down
# Report findings in raypipe.synth.clinical._FINDINGS order: nodule, ground-glass, effusion, consolidation,
# lymphadenopathy, emphysema, atelectasis, cardiomegaly.
REPORT_CT_DIMS = (0, 1, 3, 4, 5)  # describe the CT's lesion readings
REPORT_PHYS_DIMS = (2, 6, 7)  # effusion, atelectasis, cardiomegaly: physiology


@dataclass(frozen=True)
class CohortParamsV2:
    """Generating parameters of the v2 cohort; written verbatim into ``truth.json``.

    Per-site tuples are indexed by ``site % len(tuple)``.
    """

    coef_tum: float = 1.5
    coef_met: float = 1.0
    coef_phys: float = 1.0
    intercept: float = -0.6
    rho_tum_met: float = 0.5
    obs_dim: int = 8
    # CT: lesion readings = u_tum along a fixed positive direction + acquisition noise
    noise_ct: float = 0.6
    # PET: u_tum and u_met, low noise (the dominant modality)
    noise_pet: float = 0.3
    # EHR: shock contrast (signal) beside a larger sympathetic-tone factor (nuisance)
    ehr_shock: float = 0.5
    ehr_tone: float = 2.0
    noise_ehr: float = 0.3
    # Report: CT findings as read (CT observation + reader noise) and physiology findings
    report_phys: float = 0.8
    noise_report: float = 0.35
    #: sites whose reports are templated / copied forward: reader noise scale * Student-t(df)
    templated_sites: tuple[int, ...] = (1,)
    noise_report_templated_scale: float = 1.0
    noise_report_templated_df: float = 4.0
    # Missingness. PET: logistic in site and severity; EHR: outpatients (fitter patients) have none;
    # CT images and reports: lost at random (archive exports)
    pet_site_logit: tuple[float, ...] = (1.0, 0.2, -1.8)  # site 2 has no PET scanner: referrals only
    pet_severity: float = 1.0  # per unit of CT-visible tumour burden
    ehr_avail_logit: float = 1.8
    ehr_severity: float = 0.8
    missing_ct: float = 0.05
    missing_report: float = 0.10
    direction_seed: int = 4321
    missing_rate: dict = field(default_factory=dict)  # optional MCAR override per modality (see _availability)

    def to_json(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


def observation_directions(params: CohortParamsV2) -> dict[str, np.ndarray]:
    """Fixed unit directions: ``ct_tum``, ``pet_tum`` (positive: bigger tumour, brighter lesions),
    ``pet_met`` (signed), ``report_phys`` (3-d, positive), ``ehr_tone`` and ``ehr_shock``."""
    rng = np.random.default_rng(params.direction_seed)
    d = params.obs_dim

    def unit(v):
        return v / np.linalg.norm(v)

    ct = unit(np.abs(rng.standard_normal(d)) + 0.3)
    pet_tum = unit(np.abs(rng.standard_normal(d)) + 0.3)
    pet_met = rng.standard_normal(d)
    pet_met = unit(pet_met - (pet_met @ pet_tum) * pet_tum)  # orthogonal: PET separates size and activity
    phys = unit(np.abs(rng.standard_normal(len(REPORT_PHYS_DIMS))) + 0.3)
    tone, shock = np.zeros(d), np.zeros(d)
    tone[: min(d, 8)] = _EHR_TONE[: min(d, 8)]
    shock[: min(d, 8)] = _EHR_SHOCK[: min(d, 8)]
    return {"ct_tum": ct, "pet_tum": pet_tum, "pet_met": pet_met, "report_phys": phys,
            "ehr_tone": unit(tone), "ehr_shock": unit(shock)}


def _site_value(values: tuple[float, ...], site: np.ndarray) -> np.ndarray:
    return np.asarray(values, np.float64)[site % len(values)]


def _availability(rng: np.random.Generator, site: np.ndarray, u_tum: np.ndarray, u_phys: np.ndarray,
                  params: CohortParamsV2) -> tuple[dict[str, np.ndarray], np.ndarray]:
    n = len(site)
    override = {m: float(r) for m, r in params.missing_rate.items()}
    p_pet = 1.0 / (1.0 + np.exp(-(_site_value(params.pet_site_logit, site) + params.pet_severity * u_tum)))
    p_ehr = 1.0 / (1.0 + np.exp(-(params.ehr_avail_logit + params.ehr_severity * u_phys)))
    p_avail = {"ct": np.full(n, 1.0 - override.get("ct", params.missing_ct)),
               "pet": p_pet if "pet" not in override else np.full(n, 1.0 - override["pet"]),
               "ehr": p_ehr if "ehr" not in override else np.full(n, 1.0 - override["ehr"]),
               "report": np.full(n, 1.0 - override.get("report", params.missing_report))}
    avail = {m: rng.random(n) < p_avail[m] for m in MODALITIES}
    # Every patient keeps at least one modality: the CT that started the work-up.
    none = ~np.any(np.stack([avail[m] for m in MODALITIES]), axis=0)
    avail["ct"] = avail["ct"] | none
    return avail, p_pet


def generate_truth(n: int = DEFAULT_N, seed: int = 0, sites: int = 3,
                   params: CohortParamsV2 | None = None) -> pd.DataFrame:
    """Draw ``n`` patients of the v2 cohort; deterministic in ``seed``.

    Columns: those of :func:`raypipe.synth.latent.generate_truth` (sample_id, patient_id,
    site, sex, age, u_dom, u_weak, u_lazy, logit, prob, label, obs_<m> float32 arrays of
    ``obs_dim``, avail_<m>) plus u_tum, u_met, u_phys, u_tone, p_pet.
    """
    params = params or CohortParamsV2()
    if params.obs_dim < 8:
        raise ValueError("obs_dim must be at least 8 (the EHR and report layouts use 8 values)")
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4))
    u_tum, u_phys, u_tone = z[:, 0], z[:, 1], z[:, 2]
    rho = params.rho_tum_met
    u_met = rho * u_tum + np.sqrt(1.0 - rho**2) * z[:, 3]
    site = rng.integers(0, sites, n)
    logit = params.coef_tum * u_tum + params.coef_met * u_met + params.coef_phys * u_phys + params.intercept
    prob = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(n) < prob).astype(np.int64)
    sex = np.where(rng.random(n) < 0.5, "F", "M")
    age = np.clip(np.round(66 + 5 * u_phys + 9 * rng.standard_normal(n)), 18, 99).astype(np.int64)

    dirs = observation_directions(params)
    d = params.obs_dim
    ct = u_tum[:, None] * dirs["ct_tum"] + params.noise_ct * rng.standard_normal((n, d))
    pet = (u_tum[:, None] * dirs["pet_tum"] + u_met[:, None] * dirs["pet_met"]
           + params.noise_pet * rng.standard_normal((n, d)))
    ehr = (params.ehr_shock * u_phys[:, None] * dirs["ehr_shock"] + params.ehr_tone * u_tone[:, None] * dirs["ehr_tone"]
           + params.noise_ehr * rng.standard_normal((n, d)))
    report = np.zeros((n, d))
    ct_dims, phys_dims = list(REPORT_CT_DIMS), list(REPORT_PHYS_DIMS)
    report[:, ct_dims] = ct[:, ct_dims]  # the radiologist reads the CT image, noise included
    report[:, phys_dims] = params.report_phys * u_phys[:, None] * dirs["report_phys"]
    reader = params.noise_report * rng.standard_normal((n, d))
    templated = np.isin(site, params.templated_sites)
    reader[templated] = params.noise_report_templated_scale * rng.standard_t(
        params.noise_report_templated_df, (int(templated.sum()), d))
    report += reader
    avail, p_pet = _availability(rng, site, u_tum, u_phys, params)

    df = pd.DataFrame({
        "sample_id": [f"case_{i:05d}" for i in range(n)],
        "patient_id": [f"MRN{7000000 + int(x):07d}" for x in rng.choice(2_000_000, n, replace=False)],
        "site": site.astype(np.int64),
        "sex": sex,
        "age": age,
        "u_dom": u_tum, "u_weak": u_phys, "u_lazy": u_met,
        "logit": logit, "prob": prob, "label": label,
    })
    obs = {"ct": ct, "pet": pet, "ehr": ehr, "report": report}
    for m in MODALITIES:
        df[f"obs_{m}"] = list(obs[m].astype(np.float32))
        df[f"avail_{m}"] = avail[m]
    df["u_tum"], df["u_met"], df["u_phys"], df["u_tone"] = u_tum, u_met, u_phys, u_tone
    df["p_pet"] = p_pet
    return df


def bayes_auroc(truth: pd.DataFrame) -> float:
    """AUROC of the true probability ``prob``: the best any model could do in expectation."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(truth["label"], truth["prob"]))
