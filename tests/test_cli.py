"""The raypipe command: help everywhere, clear errors, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from raypipe import cli

SUBCOMMANDS = ["synth", "ingest", "embed", "train", "tune", "compare", "infer", "report", "demo"]


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for sub in SUBCOMMANDS:
        assert sub in out


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_subcommand_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([sub, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--set" in out


def test_unbuilt_stage_exits_2_without_traceback(monkeypatch, capsys):
    monkeypatch.setitem(cli.STAGES, "tune", ("raypipe.tune.no_such_module", "run"))
    assert cli.main(["tune"]) == 2
    err = capsys.readouterr().err
    assert "not implemented yet" in err and "Traceback" not in err


def test_config_error_exit_2(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  epochs: many\n")
    assert cli.main(["train", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "train.epochs" in err and str(p) in err and "Traceback" not in err


def test_synth_command_writes_cohort(tmp_path, capsys):
    out = tmp_path / "c"
    rc = cli.main(["synth", "--cohort", "clinical", "--n", "4", "--out", str(out), "--seed", "1",
                   "--set", "synth.slices=4", "--set", "synth.image_size=16"])
    assert rc == 0
    assert (out / "manifest.csv").is_file() and (out / "truth.json").is_file()
    assert '"n": 4' in capsys.readouterr().out


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "raypipe.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "raypipe" in r.stdout
