"""Write the synthetic ``regions`` cohort: multi-band GeoTIFF scenes plus region covariates.

The DF-DM setting (docs/synthetic.md): per region one or two georeferenced
6-band scenes (blue, green, red, nir, swir1, swir2; uint16 reflectance x 10000,
nodata = 0, GDAL-style band descriptions) and a row of covariates; a continuous
target. Latents ``u_urban, u_veg, u_socio ~ N(0, 1)``::

    target = 3 u_urban + 1.5 u_veg + 1 u_socio + N(0, 1)

Scenes observe u_urban (built-up patches) and u_veg (NIR/red contrast);
covariates observe u_socio and, weakly, u_urban. The Bayes reference R^2 is
``var(signal) / (var(signal) + 1)``.

Layout::

    manifest.csv    patient_id (= region id), modality (sat | covariates), format, path
    labels.csv      patient_id, label (the target), zone
    covariates.csv  patient_id, pop_density, night_light, income_index, road_km, clinic_km, school_km
    truth.json, truth.parquet
    regions/<region>/scene_<k>.tif
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pandas as pd

from raypipe.synth.publish import publish_cohort

BANDS = ("blue", "green", "red", "nir", "swir1", "swir2")
_BASE = np.array([0.06, 0.08, 0.09, 0.25, 0.20, 0.14])  # bare-soil-ish reflectance
_URBAN = np.array([0.12, 0.13, 0.14, 0.18, 0.22, 0.20])
_VEG = np.array([0.03, 0.07, 0.04, 0.45, 0.22, 0.10])
COEF = {"u_urban": 3.0, "u_veg": 1.5, "u_socio": 1.0}
NOISE_SD = 1.0


def _gdal_metadata(names) -> str:
    items = "".join(f'<Item name="DESCRIPTION" sample="{i}" role="description">{n}</Item>' for i, n in enumerate(names))
    return f"<GDALMetadata>{items}</GDALMetadata>"


def write_geotiff(path: str, bands: np.ndarray, x0: float, y0: float, pixel: float, names=BANDS, nodata: int = 0,
                  epsg: int = 32633) -> None:
    """Write a (B, H, W) uint16 array as a georeferenced GeoTIFF (planar, one band per sample)."""
    import tifffile

    geokeys = (1, 1, 0, 4,  # version, revision, minor, number of keys
               1024, 0, 1, 1,  # GTModelType = projected
               1025, 0, 1, 1,  # GTRasterType = PixelIsArea
               3072, 0, 1, epsg,  # ProjectedCSType
               3076, 0, 1, 9001)  # ProjLinearUnits = metre
    extratags = [
        (33550, "d", 3, (pixel, pixel, 0.0), True),  # ModelPixelScale
        (33922, "d", 6, (0.0, 0.0, 0.0, x0, y0, 0.0), True),  # ModelTiepoint
        (34735, "H", len(geokeys), geokeys, True),  # GeoKeyDirectory
        (42112, "s", 0, _gdal_metadata(names), True),  # GDAL_METADATA (band names)
        (42113, "s", 0, str(nodata), True),  # GDAL_NODATA
    ]
    tifffile.imwrite(path, bands, photometric="minisblack", planarconfig="separate", extratags=extratags,
                     metadata=None)


def render_scene(u_urban: float, u_veg: float, rng: np.random.Generator, size: int) -> np.ndarray:
    """(6, size, size) uint16 reflectance x 10000 with built-up and vegetation fractions from the latents."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    field = np.zeros((size, size))
    for _ in range(6):  # smooth random field: where built-up patches appear
        cy, cx, s = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.08, 0.2)
        field += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    field /= field.max()
    urban_frac = 1 / (1 + np.exp(-(u_urban + 0.3 * rng.standard_normal())))
    veg_frac = 1 / (1 + np.exp(-(u_veg + 0.3 * rng.standard_normal())))
    urban = (field > 1 - urban_frac).astype(float)
    veg = (1 - urban) * veg_frac
    refl = (_BASE[:, None, None] * (1 - urban - veg) + _URBAN[:, None, None] * urban + _VEG[:, None, None] * veg)
    refl = refl * rng.lognormal(0, 0.05, refl.shape)
    out = np.clip(np.round(refl * 10000), 1, 65535).astype(np.uint16)
    if rng.random() < 0.3:  # a nodata corner (scene edge)
        k = int(rng.integers(size // 8, size // 3))
        out[:, :k, :k] = 0
    return out


def write_regions_cohort(out_dir: str, n: int = 200, seed: int = 0, scene_size: int = 128,
                         missing_rate: dict | None = None, progress: bool = False) -> dict:
    """Write the regions cohort to ``out_dir`` (atomically) and return the truth summary."""
    missing_rate = {"sat": 0.15, "covariates": 0.1} if missing_rate is None else dict(missing_rate)
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((n, 3))
    signal = COEF["u_urban"] * u[:, 0] + COEF["u_veg"] * u[:, 1] + COEF["u_socio"] * u[:, 2]
    target = signal + NOISE_SD * rng.standard_normal(n)
    zone = np.where(rng.random(n) < 0.5, "north", "south")
    avail_sat = rng.random(n) >= missing_rate.get("sat", 0.0)
    avail_cov = rng.random(n) >= missing_rate.get("covariates", 0.0)
    avail_sat |= ~(avail_sat | avail_cov)
    ids = [f"R{i:05d}" for i in range(n)]
    cov = pd.DataFrame({
        "patient_id": ids,
        "pop_density": np.exp(5 + 0.8 * u[:, 0] + 0.3 * rng.standard_normal(n)),
        "night_light": 10 + 4 * u[:, 0] + 2 * rng.standard_normal(n),
        "income_index": 50 + 10 * u[:, 2] + 4 * rng.standard_normal(n),
        "road_km": np.abs(3 + 1.0 * u[:, 2] + rng.standard_normal(n)),
        "clinic_km": np.abs(8 - 1.5 * u[:, 2] + 2 * rng.standard_normal(n)),
        "school_km": np.abs(5 + 2 * rng.standard_normal(n)),
    })
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synth-", dir=parent)
    manifest = []
    try:
        rows = range(n)
        if progress:
            from tqdm import tqdm

            rows = tqdm(rows, desc="synth regions", unit="region")
        for i in rows:
            rrng = np.random.default_rng([seed, i])
            if avail_sat[i]:
                folder = os.path.join(tmp, "regions", ids[i])
                os.makedirs(folder, exist_ok=True)
                for k in range(1 + int(rrng.random() < 0.3)):
                    p = os.path.join(folder, f"scene_{k}.tif")
                    x0, y0 = 400000.0 + 5000 * i, 5000000.0 + 3000 * k
                    write_geotiff(p, render_scene(u[i, 0], u[i, 1], rrng, scene_size), x0, y0, pixel=10.0)
                    manifest.append((ids[i], "sat", "geotiff", os.path.relpath(p, tmp)))
            if avail_cov[i]:
                manifest.append((ids[i], "covariates", "csv", "covariates.csv"))
        cov[avail_cov].to_csv(os.path.join(tmp, "covariates.csv"), index=False)
        pd.DataFrame(manifest, columns=["patient_id", "modality", "format", "path"]).to_csv(
            os.path.join(tmp, "manifest.csv"), index=False)
        pd.DataFrame({"patient_id": ids, "label": target, "zone": zone}).to_csv(
            os.path.join(tmp, "labels.csv"), index=False)
        truth = pd.DataFrame({"sample_id": ids, "u_urban": u[:, 0], "u_veg": u[:, 1], "u_socio": u[:, 2],
                              "signal": signal, "label": target, "zone": zone,
                              "avail_sat": avail_sat, "avail_covariates": avail_cov})
        truth.to_parquet(os.path.join(tmp, "truth.parquet"), index=False)
        var_s = float(np.var(signal))
        summary = {"cohort": "regions", "n": n, "seed": seed, "scene_size": scene_size, "bands": list(BANDS),
                   "coef": COEF, "noise_sd": NOISE_SD, "missing_rate": missing_rate,
                   "bayes_r2": var_s / (var_s + NOISE_SD**2), "files": len(manifest),
                   "available": {"sat": int(avail_sat.sum()), "covariates": int(avail_cov.sum())}}
        publish_cohort(tmp, out_dir, summary)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
