"""Typed configuration of every stage: YAML in, validated, one place for defaults.

A config file is a YAML mapping with one section per stage. Every key has a
default here, so an empty file is a valid config. Overrides use dotted keys,
``--set train.lr=1e-3`` (values parsed as YAML scalars). A wrong key or a
wrong type fails with one line naming the key and the file::

    configs/demo.yaml: train.lr: Input should be a valid number (got 'fast')
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, with a one-line message that names the key and the file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------- run / ray
class RunConfig(_Section):
    name: str = "raypipe"
    out_dir: str = "runs/demo"  # every stage writes under here unless its own path is set
    seed: int = 0


class RayConfig(_Section):
    address: str | None = None  # None: RAY_ADDRESS if set, else a local Ray sized to the machine
    num_cpus: int | None = None  # local Ray only; None = all cores
    num_gpus: int | None = None  # local Ray only; None = autodetect
    progress_bars: bool = True
    log_to_driver: bool = True
    #: quiet console: Ray's own output (warnings, worker and raylet messages, Ray Data's progress
    #: logs) goes to <run.out_dir>/logs/ray.log instead of the console; raypipe's lines and Ray
    #: Data's progress bars (on a terminal) stay. `raypipe -v` shows Ray's output as well.
    quiet: bool = True
    object_store_memory: int | None = None  # bytes, local Ray only
    #: start the dashboard with a local Ray (bound to 127.0.0.1). None: when ray[default] is
    #: installed (it serves the state API that Ray Train V2's controller polls; a minimal
    #: Ray install runs without it).
    dashboard: bool | None = None
    #: level of Ray Train's own console messages (worker group start, "checkpoint created",
    #: the whole metrics dict of every report). WARNING keeps errors and warnings; raypipe
    #: prints one line per epoch itself. INFO shows Ray Train's messages too.
    train_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"


class PrivacyConfig(_Section):
    #: environment variable holding the HMAC secret for pseudonymous ids
    secret_env: str = "RAYPIPE_ID_SECRET"
    #: allow the fixed, public demo secret (only for synthetic data: demo and tests)
    allow_demo_secret: bool = False
    #: write input-relative paths as they are into errors.source_path; default (false): every path
    #: component is replaced by its keyed hash, since folder and file names often carry names,
    #: birth dates or accession numbers. Set true only when the outputs stay where the inputs are.
    plain_paths: bool = False


# ---------------------------------------------------------------------------- synth
class MissingConfig(_Section):
    """Per-modality missingness of a synthetic cohort."""

    rate: dict[str, float] = Field(default_factory=lambda: {"ct": 0.1, "pet": 0.3, "ehr": 0.15, "report": 0.2})
    #: missing-not-at-random: probability of missingness rises with the latent risk
    mnar: dict[str, float] = Field(default_factory=lambda: {"pet": 0.5})


class SynthConfig(_Section):
    cohort: Literal["clinical", "regions"] = "clinical"
    #: clinical cohort's generative model: v1 = raypipe.synth.latent (independent factors),
    #: v2 = raypipe.synth.latent2 (cross-modal redundancy, PET dominant and missing by site and
    #: severity, slow-to-fit EHR; docs/synthetic.md). v2 ignores synth.missing unless rate is set.
    generator: Literal["v1", "v2"] = "v1"
    n: int = Field(200, ge=4)
    seed: int = 0
    out: str | None = None  # default: <run.out_dir>/cohort
    slices: int = Field(24, ge=2)  # CT/PET slices per volume
    image_size: int = Field(64, ge=16)  # in-plane pixels of the synthetic volumes
    pet_nifti_fraction: float = Field(0.5, ge=0, le=1)  # share of PET volumes written as NIfTI
    sites: int = Field(3, ge=1)
    missing: MissingConfig = Field(default_factory=MissingConfig)


# ---------------------------------------------------------------------------- ingest
class SliceSelection(_Section):
    policy: Literal["all", "every_k", "central", "even"] = "even"
    n: int = Field(16, ge=1)  # central / even
    k: int = Field(2, ge=1)  # every_k


class ModalityIngest(_Section):
    """How one modality of the manifest is decoded."""

    kind: Literal["volume", "image", "geotiff", "ehr", "text", "tabular"]
    #: intensity window [lo, hi] after rescale (HU for CT, SUV or activity for PET) mapped to [0, 1];
    #: null: per-slice min-max normalisation (each slice scaled by its own min and max; meta.normalisation)
    window: tuple[float, float] | None = None
    size: int = Field(224, ge=8, le=4096)  # output in-plane size (square); at most 4096 (memory per record)
    slices: SliceSelection = Field(default_factory=SliceSelection)
    frame: int = 0  # 4-D NIfTI: which frame
    bands: list[int] | list[str] | None = None  # geotiff band selection (index or name); None = all
    percentiles: tuple[float, float] = (2.0, 98.0)  # geotiff per-band normalisation
    max_words: int = Field(150, ge=1, le=100_000)  # reports
    channels: Literal["gray", "rgb"] = "gray"  # 2-D images

    @field_validator("window")
    @classmethod
    def _finite_window(cls, v):
        if v is not None and not (all(math.isfinite(x) for x in v) and v[0] < v[1]):
            raise ValueError(f"window must be two finite numbers [lower, upper] with lower < upper (got {list(v)}); "
                             "null = per-slice min-max")
        return v

    @field_validator("percentiles")
    @classmethod
    def _percentile_range(cls, v):
        if not (all(math.isfinite(x) for x in v) and 0 <= v[0] < v[1] <= 100):
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100 (got {list(v)})")
        return v


def _default_modalities() -> dict[str, ModalityIngest]:
    return {
        "ct": ModalityIngest(kind="volume", window=(-1000.0, 400.0)),
        "pet": ModalityIngest(kind="volume", window=(0.0, 10.0)),
        "ehr": ModalityIngest(kind="ehr"),
        "report": ModalityIngest(kind="text"),
    }


class EHRConfig(_Section):
    step_hours: float = Field(2.0, gt=0)
    window_hours: float = Field(48.0, gt=0)
    #: a saved ehr_normalisation.json to apply unchanged (inference, new cohorts); None = fit on the train split
    normalisation: str | None = None
    #: physiological limits [low, high] per continuous variable (e.g. {"Heart Rate": [0, 390]}) overriding
    #: the MIMIC-III benchmark's outlier bounds (raypipe/ingest/ehr.py OUTLIER_RANGES); values outside
    #: are dropped as outliers and counted (meta.outliers)
    outlier_ranges: dict[str, tuple[float, float]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bounded_steps(self):
        steps = self.window_hours / self.step_hours
        if not math.isfinite(steps) or steps > 10_000:
            raise ValueError(f"window_hours / step_hours = {steps:g} steps per stay; at most 10000")
        for var, (lo, hi) in self.outlier_ranges.items():
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"outlier_ranges[{var!r}] must be two finite numbers with low < high")
        return self


class IngestLimits(_Section):
    """Per-file limits checked before anything is decompressed or allocated (docs/ingest.md,
    "Security and privacy"); a file over a limit is quarantined as ResourceLimit."""

    max_file_bytes: int = Field(2 * 1024**3, ge=1)  # any input file (and a deflated DICOM's inflated size)
    #: declared voxels of one file or volume: rows x columns x frames x samples (DICOM), the voxels of
    #: the one 3-D frame read (NIfTI), pixels x bands (TIFF), pixels (2-D images); 2**28 = 1 GiB as float32
    max_voxels: int = Field(2**28, ge=1)
    max_frames: int = Field(20_000, ge=1)  # frames of one multi-frame DICOM file
    max_report_bytes: int = Field(1024**2, ge=1)  # bytes of a report read (the rest is ignored)
    max_table_bytes: int = Field(256 * 1024**2, ge=1)  # EHR and tabular CSV files


class ScanConfig(_Section):
    """Ingest from a folder without a manifest (``raypipe scan``, ``raypipe ingest --input DIR``)."""

    #: auto: scan when the input has neither manifest.csv nor a patients/ folder; always; never
    use: Literal["auto", "always", "never"] = "auto"
    out: str | None = None  # inferred manifest, scan errors and summary; default: <run.out_dir>/scan
    #: DICOM Modality (0008,0060) -> configured ingest modality; a code without an entry, or whose
    #: target is not in ingest.modalities, is reported as unmapped (never silently dropped)
    modality_map: dict[str, str] = Field(default_factory=lambda: {
        "CT": "ct", "PT": "pet", "MR": "mr", "CR": "xray", "DX": "xray", "DR": "xray"})
    files_per_task: int = Field(512, ge=1)  # DICOM headers read per Ray task


class IngestConfig(_Section):
    input: str | None = None  # cohort root (manifest.csv inside); default: synth.out
    out: str | None = None  # default: <run.out_dir>/records
    modalities: dict[str, ModalityIngest] = Field(default_factory=_default_modalities)
    ehr: EHRConfig = Field(default_factory=EHRConfig)
    limits: IngestLimits = Field(default_factory=IngestLimits)
    label_columns: list[str] = Field(default_factory=lambda: ["label"])
    group_columns: list[str] = Field(default_factory=lambda: ["site", "sex", "age_band"])
    #: fraction of input files that may be quarantined before the run exits non-zero
    error_budget: float = Field(0.05, ge=0, le=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)  # held-out patients (split fixed at ingest for EHR stats)
    #: work items (slices, files) per Ray task: fixed, so output files do not depend on the cluster size;
    #: larger amortises Ray's per-task cost (benchmarks/RESULTS.md), smaller streams in finer steps
    items_per_task: int = Field(128, ge=1)
    scan: ScanConfig = Field(default_factory=ScanConfig)
    #: stored dtype of image records (windowed to [0, 1]): uint8 = round(255 * v) (49 KB per 224x224 slice
    #: before compression, error <= 1/510), float16, or float32 (200 KB, the schema-1 layout); EHR is float16
    payload_dtype: Literal["uint8", "float16", "float32"] = "uint8"
    #: arrays of a declared shape in fixed-shape tensor columns `tensor_<m>` (read as arrays by pandas,
    #: pyarrow, Ray Data) or, false, as raw `payload` bytes of the same dtype: about 2x cheaper to read
    #: (Parquet stores a tensor as a nested list with levels per value); benchmarks/RESULTS.md, issue 17
    tensor_columns: bool = True


# ---------------------------------------------------------------------------- embed
class ImageEmbed(_Section):
    model: str = "microsoft/resnet-34"  # hub name or local directory
    revision: str | None = None
    weights: Literal["pretrained", "random"] = "pretrained"
    input_size: int = Field(224, ge=16)
    #: slices -> one vector per series, then per sample: mean or max; "all" keeps the
    #: slices (attention-ready): shape (keep_slices, dim), series in order, resampled
    #: along the slice axis to exactly keep_slices (nearest, no zero padding)
    aggregation: Literal["mean", "max", "all"] = "mean"
    keep_slices: int = Field(16, ge=1)  # with aggregation=all
    #: >3 band images: how to map bands to the model's 3 input channels
    band_projection: Literal["select", "pca", "mean_groups"] = "mean_groups"
    band_indices: list[int] | None = None  # with band_projection=select: the three bands to use


class TextEmbed(_Section):
    model: str = "bert-base-uncased"
    revision: str | None = None
    weights: Literal["pretrained", "random"] = "pretrained"
    pooling: Literal["cls", "mean"] = "cls"
    max_tokens: int = Field(512, ge=8, le=4096)


class EmbedConfig(_Section):
    input: str | None = None  # records dir; default: ingest.out
    out: str | None = None  # default: <run.out_dir>/embeddings
    image: ImageEmbed = Field(default_factory=ImageEmbed)
    text: TextEmbed = Field(default_factory=TextEmbed)
    batch_size: int | None = Field(None, ge=1)  # rows per model call; None = 256 on GPU actors, 32 on CPU
    pool_size: int | None = None  # actors per model; None = derived from the cluster's resources
    num_gpus_per_actor: float | None = None  # None = 0.5 (two actors per GPU) if the cluster has GPUs else 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: samples per resumable chunk (a crashed run restarts at the first unfinished chunk)
    chunk_samples: int = Field(4096, ge=1)


# ---------------------------------------------------------------------------- train
class OmniFuseConfig(_Section):
    """OmniFuse hyper-parameters (docs/method.md); defaults are the paper's."""

    depth: int = Field(5, ge=1, le=16)  # R, residual autoencoders per cascade
    alpha: float = Field(0.1, ge=0)
    beta: float = Field(0.5, ge=0)
    lambda1: float = Field(1.0, ge=0)
    lambda2: float = Field(10.0, ge=0)
    lambda3: float = Field(0.5, ge=0)
    use_imp_forward: bool = True
    use_imp_backward: bool = True
    use_dwfuse: bool = True
    use_tla: bool = True
    #: sum: losses summed as in the paper's Eq. 7, 8, 12 (squared norm over the imputed vector, CE
    #: summed over modalities), so lambda = (1, 10, 0.5) mean what they mean; mean: per-element and
    #: per-modality means (the earlier normalised variant). docs/fusion.md has the measurements.
    loss_scale: Literal["sum", "mean"] = "sum"
    #: an absent modality's encoder input: mean = zero in the encoder's standardised space (the
    #: training mean); zero_input = the paper's e_m(0), raw zeros standardised like any input
    absent_fill: Literal["mean", "zero_input"] = "mean"
    #: forward-imputation loss over every slot whose truth is known (known, the paper's Eq. 7) or
    #: only over the slots hidden by the missing-pattern simulation (dropped)
    imp_forward_on: Literal["known", "dropped"] = "known"
    #: TLA mines the lazy subset after every k-th epoch (1 = every epoch, the paper's schedule)
    mine_every: int = Field(1, ge=1)
    #: the joint head sees the cascade latents and also v, the observed / filled slots (a skip
    #: around the cascade); false = the paper's latents only. Default true (with imputed_trust
    #: reliability) by the rule and measurements in docs/fusion.md ("Making the imputation earn
    #: its place"); the paper's configuration is joint_skip false, imputed_trust same
    joint_skip: bool = True
    #: DWFuse weight of an imputed slot: same as observed (the paper) or scaled by the cascade's
    #: running reliability max(0, 1 - NMSE) (reliability, the default: see joint_skip)
    imputed_trust: Literal["same", "reliability"] = "reliability"
    #: which losses train what: all (the paper: every loss reaches cascades and encoders);
    #: imputation (the heads read the cascade's output through a stop-gradient: only the imputation
    #: losses train the cascades); separate (also the cascade's input v is detached: the imputation
    #: losses train the cascades only, the classification losses the encoders and heads only)
    cascade_grad: Literal["all", "imputation", "separate"] = "all"


class AutoConfig(_Section):
    """``train.method: auto``: pick (and ensemble) fusion methods by k-fold CV (docs/tune.md)."""

    #: methods to cross-validate: names, or {"method": name, <train key>: value, ...} to give one
    #: candidate its own train settings (e.g. {"method": "omnifuse", "epochs": 50}); empty =
    #: every registered method suited to the task, each with the train section's settings
    candidates: list[str | dict[str, Any]] = Field(default_factory=list)
    folds: int = Field(5, ge=2)
    #: seconds for the cross-validation; fits still running then are cancelled and their
    #: candidates skipped (named in the summary and the leaderboard). None = no limit
    time_limit: float | None = Field(None, gt=0)
    #: the metric that ranks candidates and builds the ensemble: "auto" = the task's main metric
    #: (auroc / r2), or any metric the task reports (accuracy, macro_f1, auprc, brier, mae, ...)
    metric: str = "auto"
    #: greedy ensemble selection steps (Caruana et al. 2004, with replacement); 0 = no ensemble
    ensemble_size: int = Field(25, ge=0)
    #: how the model to refit is chosen from the CV scores (raypipe.tune.auto.choose_model, docs/tune.md):
    #: ensemble_1se = the ensemble unless the best single candidate's mean beats it by more than one
    #: standard error of the per-fold paired differences; best = the highest mean; simplest_1se = the
    #: fewest trainable parameters among single candidates within one SE of the best (Breiman's rule)
    select: Literal["best", "ensemble_1se", "simplest_1se"] = "ensemble_1se"
    #: what is done with the chosen model (raypipe.tune.auto, docs/tune.md): bag = no refit, its k
    #: cross-validation fold models predict together (the mean of their probabilities; an ensemble: weight
    #: w/k on each fold model of each member; k x the inference compute); full = refitted on the full
    #: training split. bag by a rule stated before measuring (benchmarks/fusion_quality_auto.py's 9
    #: conditions: criterion met 8/9 as full, mean held-out AUROC 0.9052 vs 0.9021; demo run 11.4-12.4 min)
    refit: Literal["full", "bag"] = "bag"
    #: > 0: before the CV, a Ray Tune search of each candidate's hyper-parameters (tune.space,
    #: tune.scheduler; random draws seeded by run.seed) on the same folds, this many trials per
    #: candidate; each candidate is then cross-validated with its best trial's values. 0 = none
    tune_trials: int = Field(0, ge=0)


class TrainConfig(_Section):
    input: str | None = None  # embeddings dir; default: embed.out
    out: str | None = None  # run dir; default: <run.out_dir>/train/<method>
    method: str = "omnifuse"
    task: Literal["auto", "binary", "multiclass", "multilabel", "regression"] = "auto"
    hidden_dim: int = Field(128, ge=4)  # D
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    p_drop: float = Field(0.5, ge=0, le=1)  # missing-pattern simulation probability
    patience: int = Field(8, ge=1)  # early stopping on the validation metric
    val_fraction: float = Field(0.2, gt=0, lt=1)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    #: autocast dtype of the training forward pass. auto: bf16 on a GPU that supports it (else
    #: fp16 with loss scaling), fp32 on CPU. Evaluation and prediction always run in fp32.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: persist a checkpoint every k epochs; the epoch of a new best validation score and the last
    #: epoch (the final one, or the early-stopped one) are persisted whatever k is. A crash repeats
    #: at most the epochs since the last persisted checkpoint (docs/train.md, "Checkpoints and failures")
    checkpoint_every: int = Field(1, ge=1)
    #: upload each checkpoint to run.out_dir in a background thread of the worker (Ray Train's
    #: CheckpointUploadMode.ASYNC): the next epoch starts while the previous one is being persisted
    checkpoint_async: bool = True
    #: worker-group failures (a node lost, a worker killed) one run survives, each restarting the
    #: workers from the last registered checkpoint (Ray Train's FailureConfig); -1 = no limit
    max_failures: int = Field(2, ge=-1)
    #: how the workers get their share of the splits. "memory": the driver reads the split's rows
    #: once into Ray's object store and each worker takes its share (no Ray Data execution per
    #: run); "ray_data": a Ray Dataset per split, streamed to the workers (get_dataset_shard);
    #: "auto": memory when the input table is at most 256 MiB uncompressed, else ray_data
    feed: Literal["auto", "memory", "ray_data"] = "auto"
    omnifuse: OmniFuseConfig = Field(default_factory=OmniFuseConfig)
    #: extra keyword arguments for the chosen method (e.g. {"rho": 0.5} for metafusion)
    method_args: dict[str, Any] = Field(default_factory=dict)
    #: with method "auto": the candidates, folds, time limit, metric and ensemble (AutoConfig)
    auto: AutoConfig = Field(default_factory=AutoConfig)


# ---------------------------------------------------------------------------- tune / infer / report
class TuneConfig(_Section):
    out: str | None = None
    num_samples: int = Field(8, ge=1)
    folds: int = Field(5, ge=2)
    search: Literal["random", "grid", "optuna"] = "random"
    scheduler: Literal["fifo", "asha"] = "fifo"
    #: what tune and compare rank by: "auto" = the task's main metric (auroc / r2), or any metric
    #: the task reports (accuracy, macro_f1, f1, auprc, brier, r2, mae, smape, ...)
    metric: str = "auto"
    #: rows tune and compare cross-validate: "test_split" = every row not in the test split (the
    #: table's split column, else ingest.test_fraction); "none" = every row of the table
    holdout: Literal["test_split", "none"] = "test_split"
    max_concurrent_trials: int | None = None
    space: dict[str, Any] = Field(default_factory=dict)  # overrides of the default search space
    #: how a trial fits its folds: "trial" = the framework-free loop inside the trial's own process
    #: (1 CPU, or 1 GPU with train.use_gpu, per trial); "ray_train" = one Ray Train V2 TorchTrainer
    #: per fold (train.num_workers workers, DDP); "auto" = "trial" for 1-worker training, else "ray_train"
    fold_runner: Literal["auto", "trial", "ray_train"] = "auto"


class InferConfig(_Section):
    checkpoint: str | None = None
    input: str | None = None
    out: str | None = None
    batch_size: int = Field(1024, ge=1)
    pool_size: int | None = None
    #: GPUs per predictor actor (0 = CPU). With GPUs the pool defaults to one actor per GPU.
    num_gpus_per_actor: float = Field(0, ge=0)
    #: rows Ray Data hands a predictor actor at a time (one Arrow -> numpy conversion and one output
    #: block per batch); the model predicts them in chunks of batch_size
    rows_per_actor_batch: int = Field(16384, ge=1)


class ReportConfig(_Section):
    run_dir: str | None = None
    subgroup_gap_threshold: float = Field(0.05, ge=0)


class RetrieveConfig(_Section):
    """Cross-modal retrieval (`raypipe retrieve fit|query`, docs/retrieve.md)."""

    input: str | None = None  # embeddings dir; default: train.input
    out: str | None = None  # default: <run.out_dir>/retrieve (fit: model/, query: query_<from>_<to>/)
    #: modality pairs aligned in one shared space, "A:B" (symmetric)
    pairs: list[str] = Field(default_factory=lambda: ["report:ct"])
    dim: int = Field(64, ge=2)  # shared-space dimension
    hidden: int = Field(256, ge=2)  # projection head hidden width
    temperature: float = Field(0.07, gt=0, le=1)  # initial temperature (learned)
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(256, ge=4)  # InfoNCE negatives come from the batch: larger is harder
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    patience: int = Field(8, ge=1)  # early stopping on the validation loss
    val_fraction: float = Field(0.2, gt=0, lt=1)
    num_workers: int = Field(1, ge=1)
    #: query: the query modality, the modality searched, hits per query, which rows query
    query_modality: str = "report"
    target_modality: str = "ct"
    k: int = Field(10, ge=1)
    queries: Literal["test", "all"] = "test"
    index: Literal["hnsw", "exact"] = "hnsw"
    hnsw_m: int = Field(32, ge=2)
    hnsw_ef_construction: int = Field(200, ge=8)
    hnsw_ef_search: int = Field(200, ge=1)
    batch_rows: int = Field(4096, ge=1)  # rows per projection batch (Ray Data map_batches)
    pool_size: int | None = None  # projection actors; default: CPUs - 1


# ---------------------------------------------------------------------------- root
class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    retrieve: RetrieveConfig = Field(default_factory=RetrieveConfig)

    # Resolved paths: each stage's input defaults to the previous stage's output.
    def path(self, *parts: str) -> str:
        return os.path.join(self.run.out_dir, *parts)

    @property
    def cohort_dir(self) -> str:
        return self.synth.out or self.path("cohort")

    @property
    def ingest_input(self) -> str:
        return self.ingest.input or self.cohort_dir

    @property
    def records_dir(self) -> str:
        return self.ingest.out or self.path("records")

    @property
    def embed_input(self) -> str:
        return self.embed.input or self.records_dir

    @property
    def embeddings_dir(self) -> str:
        return self.embed.out or self.path("embeddings")

    @property
    def train_input(self) -> str:
        return self.train.input or self.embeddings_dir

    def train_dir(self, method: str | None = None) -> str:
        return self.train.out or self.path("train", method or self.train.method)


# ---------------------------------------------------------------------------- loading
def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(root)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and not isinstance(first["input"], (dict, list)):
        msg = f"{msg} (got {first['input']!r})"
    more = len(err.errors()) - 1
    tail = f" (+{more} more)" if more else ""
    return f"{source}: {loc}: {msg}{tail}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into (["a","b","c"], yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set train.lr=1e-3")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {item}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a nested dict (in place; also returned)."""
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if not isinstance(nxt, dict):
                nxt = {}
                node[k] = nxt
            node = nxt
        node[keys[-1]] = value
    return data


def config_from_dict(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate a nested mapping into a :class:`Config`, raising :class:`ConfigError`."""
    try:
        return Config.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{source}:{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping of sections at the top level")
        data = loaded
    if not overrides:
        return config_from_dict(data, source)
    # Overrides apply on top of the file *with its defaults filled in*, so that
    # `--set ingest.modalities.ct.size=64` changes one key instead of replacing the dict.
    base = config_from_dict(data, source).model_dump(mode="json")
    return config_from_dict(apply_overrides(base, overrides), f"{source} (with --set)")


def dump_config(cfg: Config) -> str:
    """YAML text of a config that :func:`load_config` accepts unchanged."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def fingerprint(data: Any) -> str:
    """8 hex digits of SHA-1 over ``data`` as sorted-key JSON: names runs and searches by what they compute."""
    import hashlib
    import json

    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:8]
