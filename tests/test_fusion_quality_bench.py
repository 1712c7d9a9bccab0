"""benchmarks/fusion_quality.py: its data sets, masks and statistics, and a tiny end-to-end run.

Functional checks only (the code path works, the numbers are well-formed); no quality assertion.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "fusion_quality.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("fusion_quality_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_breast_cancer_is_split_into_its_three_natural_views(bench):
    from sklearn.datasets import load_breast_cancer

    raw = load_breast_cancer()
    data = bench.load_dataset("breast_cancer")
    assert data.modalities == ["mean", "se", "worst"] and data.task == "binary" and len(data.y) == 569
    # WDBC's published column order: 10 means, then their 10 standard errors, then the 10 worst values
    np.testing.assert_array_equal(data.views["mean"], raw.data[:, 0:10].astype(np.float32))
    np.testing.assert_array_equal(data.views["se"], raw.data[:, 10:20].astype(np.float32))
    np.testing.assert_array_equal(data.views["worst"], raw.data[:, 20:30].astype(np.float32))
    assert data.natural.all()
    small = bench.load_dataset("breast_cancer", n=100, seed=0)
    assert len(small.y) == 100 and 0.3 < small.y.mean() < 0.8  # stratified: the 63 % benign share kept


def test_view_dropout_masks_match_the_closed_form_and_are_shared(bench):
    natural = np.ones((20000, 3), dtype=bool)
    for rate in (0.5, 0.9):
        mask = bench.drop_at_random(natural, rate, seed=1)
        assert mask.any(axis=1).all()  # at least one view per sample
        # each view dropped with p = r, a sample that lost all three gets one back:
        # expected dropped share = (3 r - r^3) / 3 = 0.4583 (r = .5), 0.657 (r = .9)
        assert 1 - mask.mean() == pytest.approx(rate - rate**3 / 3, abs=0.01)
        np.testing.assert_array_equal(mask, bench.drop_at_random(natural, rate, seed=1))  # seeded
    partial = natural.copy()
    partial[::2, 0] = False  # a view that is naturally absent never comes back
    assert not bench.drop_at_random(partial, 0.5, seed=2)[::2, 0].any()

    class _Data:
        natural = partial

    conds = bench.make_conditions(_Data, [0.0, 0.5, 0.9], seed=0)
    assert list(conds) == ["drop 0%", "drop 50%", "drop 90%"]
    np.testing.assert_array_equal(conds["drop 0%"], partial)


def test_fold_spread_is_the_sample_standard_deviation(bench):
    assert bench._sd([1.0, 2.0, 3.0]) == pytest.approx(1.0)  # ddof = 1 (ddof = 0 would give 0.8165)
    assert math.isnan(bench._sd([0.7]))


def test_tiny_breast_cancer_run_produces_every_table(bench, capsys, tmp_path):
    saved = str(tmp_path / "run.json")
    scores = bench.main(["--dataset", "breast_cancer", "--n", "80", "--folds", "2", "--epochs", "1",
                         "--methods", "omnifuse,concat", "--no-ablation", "--no-single", "--dropout", "0,0.5",
                         "--json", saved])
    out = capsys.readouterr().out
    assert list(scores) == ["drop 0%", "drop 50%"]
    for cond in scores:
        assert set(scores[cond]) == {"ref: logistic regression, all views", "omnifuse", "concat"}
        for label, rows in scores[cond].items():
            assert len(rows) == 2 and all(0.0 <= r["auroc"] <= 1.0 for r in rows), label
        for label in ("omnifuse", "concat"):
            assert all(r["seconds_per_epoch"] > 0 and r["epochs"] == 1 for r in scores[cond][label])
    assert "mean ± std (ddof = 1)" in out
    assert "| **omnifuse** |" in out and "| concat |" in out and "| ref: logistic regression, all views |" in out
    assert "p vs omnifuse (drop 50%)" in out
    assert "fit time per epoch" in out and "x concat" in out
    # the saved per-fold numbers print the same tables again (how parallel runs are merged)
    again = bench.main(["--from-json", saved])
    assert again == scores
    assert "| **omnifuse** |" in capsys.readouterr().out


def test_synthetic2_is_wired_and_says_clearly_when_its_generator_is_missing(bench, monkeypatch):
    try:
        import raypipe.synth.latent2  # noqa: F401
    except ImportError:
        pass
    else:
        data = bench.load_dataset("synthetic2", n=60, seed=0)
        assert data.task == "binary" and len(data.y) == 60 and len(data.modalities) >= 2
        assert "ref: Bayes (true probability)" in data.references
    monkeypatch.setitem(sys.modules, "raypipe.synth.latent2", None)  # makes the import fail
    with pytest.raises(SystemExit, match=r"raypipe\.synth\.latent2"):
        bench.load_dataset("synthetic2", n=60, seed=0)


def test_htad_views_from_the_multiviewstacking_package(bench):
    pytest.importorskip("multiviewstacking")
    data = bench.load_dataset("htad")
    assert data.task == "multiclass" and data.n_classes == 7 and len(data.y) == 1386
    assert {m: v.shape[1] for m, v in data.views.items()} == {"audio": 36, "accelerometer": 16}


def test_unknown_dataset_and_bad_rates_are_clear_errors(bench):
    with pytest.raises(SystemExit):
        bench.main(["--dataset", "mnist"])
    with pytest.raises(SystemExit, match="--dropout"):
        bench.main(["--dataset", "breast_cancer", "--dropout", "0,1.5"])


def test_merge_takes_each_row_from_the_last_file_that_has_it(bench):
    first = {"drop 0%": {"concat": [{"auroc": 0.7}], "late": [{"auroc": 0.6}]},
             "drop 50%": {"concat": [{"auroc": 0.5}]}}
    rerun = {"drop 0%": {"late": [{"auroc": 0.65}], "omnifuse": [{"auroc": 0.8}]}}
    merged, replaced = bench.merge_scores([first, rerun])
    assert merged == {"drop 0%": {"concat": [{"auroc": 0.7}], "late": [{"auroc": 0.65}], "omnifuse": [{"auroc": 0.8}]},
                      "drop 50%": {"concat": [{"auroc": 0.5}]}}
    assert replaced == [("drop 0%", "late", 1)]
    merged, replaced = bench.merge_scores([rerun, first])  # the order decides
    assert merged["drop 0%"]["late"] == [{"auroc": 0.6}] and replaced == [("drop 0%", "late", 1)]
    # a row that a run stopped early did not reach for a condition: a "not run" cell, not an error
    two = {"drop 0%": {"concat": [{"auroc": 0.7}, {"auroc": 0.9}], "late": [{"auroc": 0.6}, {"auroc": 0.8}]},
           "drop 50%": {"concat": [{"auroc": 0.5}, {"auroc": 0.7}]}}
    lines = bench.metric_table(two, "auroc")
    assert "| late | 0.700 ± 0.141 | not run | - | - |" in lines  # sd of (0.6, 0.8), ddof 1: 0.1414


def test_goal_checks_state_the_comparisons_hand_worked(bench):
    rows = lambda *v: [{"auroc": x} for x in v]  # noqa: E731
    scores = {"drop 50%": {"ref: logistic regression, all views": rows(0.99, 0.99, 0.99),
                           "omnifuse": rows(0.8, 0.9, 0.7), "concat": rows(0.7, 0.85, 0.7),
                           "omnifuse row b (DWFuse)": rows(0.9, 0.9, 0.9),
                           "auto": rows(0.6, 0.6, 0.6),
                           "auto ensemble": [dict(r, candidates=["concat", "omnifuse row b (DWFuse)"])
                                             for r in rows(0.85, 0.8, 0.8)]}}
    lines = bench.goal_checks(scores, "auroc")
    # omnifuse 0.8 vs concat 0.75: paired diffs .1, .05, 0 -> t = 1.732, df 2, p = 0.225
    assert lines[0] == ("- drop 50%: omnifuse >= concat (0.800 vs 0.750, diff +0.050, p = 0.23); "
                        "< omnifuse row b (0.800 vs 0.900, diff -0.100, p = 0.23).")
    # best single method: row b 0.9 (the reference 0.99 is not a method), fold-std 0: auto 0.6 is not within
    assert lines[1] == ("- drop 50%: auto 0.600 vs best single method omnifuse row b (DWFuse) 0.900 ± 0.000: "
                        "NOT within one fold-std (diff -0.300).")
    assert lines[2].startswith("- drop 50%: ensemble 0.817 vs its best member omnifuse row b (DWFuse) 0.900")


def test_auto_choice_is_the_inner_cv_best_and_a_tie_goes_to_the_single_method(bench):
    auto = _auto_module()
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1], dtype=float)
    inner = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    perfect = np.stack([1 - y, y], 1) * 0.8 + 0.1
    inverted = perfect[:, ::-1].copy()
    chosen, means, weights, per_fold = auto.choose("binary", y, inner, {"a": inverted, "b": perfect})
    # b ranks every positive above every negative in both inner folds (AUROC 1), a in none (0); the ensemble
    # picks b at each step (adding a lowers the score), so it scores 1 too and the tie goes to b itself
    assert means == {"a": 0.0, "b": 1.0, "ensemble": 1.0}
    assert chosen == "b" and weights == {"a": 0.0, "b": 1.0}
    assert per_fold == {"a": [0.0, 0.0], "b": [1.0, 1.0], "ensemble": [1.0, 1.0]}


def _auto_module():
    path = _PATH.parent / "fusion_quality_auto.py"
    spec = importlib.util.spec_from_file_location("fusion_quality_auto_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_auto_run_scores_the_table_rows_own_fits_and_merges(bench, capsys, tmp_path):
    auto = _auto_module()
    common = ["--dataset", "breast_cancer", "--n", "60", "--folds", "2", "--epochs", "1", "--dropout", "0.5"]
    bench.main(common + ["--methods", "concat,sum", "--no-ablation", "--no-single", "--json", str(tmp_path / "b.json")])
    auto.main(["--candidates", "concat,sum", "--inner-folds", "2", "--cache", str(tmp_path / "cache")] + common
              + ["--json", str(tmp_path / "a.json")])
    with open(tmp_path / "a.json") as fh:
        saved = json.load(fh)
    with open(tmp_path / "b.json") as fh:
        table = json.load(fh)["scores"]["drop 50%"]
    for d in saved["auto"]["folds"]:  # auto's outer fits are the table rows' fits (same call, same seed)
        for label in ("concat", "sum"):
            assert d["outer"][label] == pytest.approx(table[label][d["fold"]]["auroc"], abs=1e-12)
        chosen = saved["scores"]["drop 50%"]["auto"][d["fold"]]
        if d["chosen"] != "ensemble":
            assert chosen["auroc"] == pytest.approx(d["outer"][d["chosen"]], abs=1e-12)
    capsys.readouterr()
    merged = bench.main(["--from-json", str(tmp_path / "b.json"), str(tmp_path / "a.json")])
    assert set(merged["drop 50%"]) >= {"concat", "sum", "auto", "auto ensemble"}
    out = capsys.readouterr().out
    assert "| auto |" in out and "one fold-std" in out


def test_omnifuse_overrides_and_variant_rows_reach_the_config(bench):
    args = bench.build_parser().parse_args(
        ["--methods", "omnifuse", "--ablation", "b", "--set", "omnifuse.joint_skip=true",
         "--set", "train.omnifuse.imputed_trust=reliability", "--variant", "sep:cascade_grad=separate,mine_every=2"])
    assert bench.omnifuse_overrides(args) == {"joint_skip": True, "imputed_trust": "reliability"}
    runs = bench.plan_runs(args)
    assert [r[0] for r in runs] == ["omnifuse", "omnifuse row b (DWFuse)", "omnifuse variant sep"]
    assert runs[2][2] == {"cascade_grad": "separate", "mine_every": 2}
    assert "joint_skip = True" in bench._overrides_text(args)
    for bad in (["--set", "omnifuse.no_such_key=1"], ["--set", "train.lr=1"], ["--set", "omnifuse.cascade_grad=bogus"],
                ["--variant", "nolabel"], ["--variant", "x:cascade_grad"]):
        with pytest.raises(SystemExit):
            a = bench.build_parser().parse_args(bad)
            bench.omnifuse_overrides(a), bench.parse_variants(a)


def test_merge_accepts_files_from_before_set_and_refuses_mixed_omnifuse_overrides(bench, tmp_path, capsys):
    args = vars(bench.build_parser().parse_args(["--dataset", "breast_cancer", "--n", "80", "--folds", "2"]))
    rows = lambda v: [{"auroc": v, "seconds_per_epoch": 0.1, "epochs": 1}] * 2  # noqa: E731
    old = {k: v for k, v in args.items() if k not in ("set", "variant")}  # a file written before these options
    files = {"old": {"args": old, "scores": {"drop 0%": {"concat": rows(0.9)}}, "seconds": 1},
             "new": {"args": {**args, "set": ["omnifuse.joint_skip=true"]},
                     "scores": {"drop 0%": {"omnifuse": rows(0.95)}}, "seconds": 1},
             "other": {"args": {**args, "set": []}, "scores": {"drop 0%": {"omnifuse row b (DWFuse)": rows(0.9)}},
                       "seconds": 1}}
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    merged = bench.main(["--from-json", str(tmp_path / "old.json"), str(tmp_path / "new.json")])
    assert set(merged["drop 0%"]) >= {"concat", "omnifuse"}
    assert "joint_skip = True" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="different --set"):
        bench.main(["--from-json", str(tmp_path / "new.json"), str(tmp_path / "other.json")])
