"""Shared argument handling of the job entry points (kept tiny: jobs are recipes)."""

from __future__ import annotations

import argparse
import logging

from raypipe.config import Config, load_config


def job_config(description: str) -> Config:
    """Parse ``--config FILE --set k=v ...`` and return the validated config."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config (paths may be s3:// or gs:// URIs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Ray's own messages in the job log too (by default only in <out_dir>/logs/ray.log, on "
                        "the driver's node; with an s3:// or gs:// out_dir they stay in the job log)")
    args = parser.parse_args()
    from raypipe import console

    console.set_verbose(args.verbose)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return load_config(args.config, args.overrides)
