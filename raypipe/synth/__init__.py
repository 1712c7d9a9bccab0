"""Synthetic cohorts written in real file formats, with their ground truth (docs/synthetic.md)."""

from __future__ import annotations

from raypipe.config import Config


def write_cohort(cfg: Config, progress: bool = True) -> dict:
    """Write the cohort described by ``cfg.synth`` to ``cfg.cohort_dir``; return its truth summary."""
    from raypipe import console

    progress = progress and console.bars_wanted(cfg)
    s = cfg.synth
    if s.cohort == "clinical":
        from raypipe.synth.clinical import write_clinical_cohort

        if s.generator == "v2":
            # v2's missingness is structural (site, severity); synth.missing.rate replaces it only when
            # it differs from the v1 default (a loaded config marks every default as set)
            from raypipe.config import MissingConfig

            rate = s.missing.rate if s.missing.rate != MissingConfig().rate else None
            return write_clinical_cohort(cfg.cohort_dir, n=s.n, seed=s.seed, slices=s.slices,
                                         image_size=s.image_size, sites=s.sites,
                                         pet_nifti_fraction=s.pet_nifti_fraction, missing_rate=rate,
                                         progress=progress, generator="v2")
        return write_clinical_cohort(cfg.cohort_dir, n=s.n, seed=s.seed, slices=s.slices, image_size=s.image_size,
                                     sites=s.sites, pet_nifti_fraction=s.pet_nifti_fraction,
                                     missing_rate=s.missing.rate, mnar=s.missing.mnar, progress=progress)
    from raypipe.synth.regions import write_regions_cohort

    rates = {k: v for k, v in s.missing.rate.items() if k in ("sat", "covariates")} or None
    return write_regions_cohort(cfg.cohort_dir, n=s.n, seed=s.seed, scene_size=2 * s.image_size,
                                missing_rate=rates, progress=progress)
