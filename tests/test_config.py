"""Typed config: YAML in, validated, one-line errors that name the key and the file."""

from __future__ import annotations

import pytest

from raypipe.config import Config, ConfigError, dump_config, load_config


def test_defaults_are_valid():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.train.method == "omnifuse"
    assert cfg.train.omnifuse.depth == 5 and cfg.train.omnifuse.alpha == 0.1 and cfg.train.omnifuse.beta == 0.5
    assert (cfg.train.omnifuse.lambda1, cfg.train.omnifuse.lambda2, cfg.train.omnifuse.lambda3) == (1, 10, 0.5)
    assert cfg.ingest.modalities["ct"].window == (-1000.0, 400.0)
    assert cfg.ingest.modalities["ct"].slices.policy == "even" and cfg.ingest.modalities["ct"].slices.n == 16


def test_demo_config_loads():
    from raypipe.cli import DEMO_CONFIG

    cfg = load_config(DEMO_CONFIG)
    assert cfg.privacy.allow_demo_secret and cfg.embed.image.weights == "random"


def test_overrides_parse_yaml_scalars(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 0.01\n")
    cfg = load_config(p, ["train.lr=1e-3", "train.omnifuse.use_tla=false", "ingest.group_columns=[site]"])
    assert cfg.train.lr == 1e-3 and cfg.train.omnifuse.use_tla is False
    assert cfg.ingest.group_columns == ["site"]


@pytest.mark.parametrize("text,needle", [
    ("train:\n  lr: fast\n", "train.lr"),
    ("train:\n  bogus: 1\n", "train.bogus: unknown key"),
    ("nosuchsection: {}\n", "nosuchsection: unknown key"),
    ("ingest:\n  modalities:\n    ct: {kind: hologram}\n", "ingest.modalities.ct.kind"),
])
def test_errors_are_one_line_naming_key_and_file(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    msg = str(info.value)
    assert "\n" not in msg and str(p) in msg and needle in msg


def test_invalid_yaml_and_missing_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_dump_roundtrip(tmp_path):
    cfg = load_config(None, ["train.method=concat", "run.seed=7"])
    p = tmp_path / "out.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_stage_paths_chain():
    cfg = load_config(None, ["run.out_dir=/x"])
    assert cfg.cohort_dir == "/x/cohort" and cfg.ingest_input == "/x/cohort"
    assert cfg.records_dir == "/x/records" and cfg.embed_input == "/x/records"
    assert cfg.embeddings_dir == "/x/embeddings" and cfg.train_input == "/x/embeddings"
    assert cfg.train_dir() == "/x/train/omnifuse"


def test_every_shipped_config_validates():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.yaml"))
    assert {f.name for f in files} >= {"demo.yaml", "icu.yaml", "lung.yaml", "regions.yaml"}
    for f in files:
        load_config(f)


def test_override_merges_into_defaults_instead_of_replacing():
    cfg = load_config(None, ["ingest.modalities.ct.size=64", "ingest.modalities.cxr={kind: image}"])
    assert cfg.ingest.modalities["ct"].size == 64 and cfg.ingest.modalities["ct"].window == (-1000.0, 400.0)
    assert set(cfg.ingest.modalities) == {"ct", "pet", "ehr", "report", "cxr"}
