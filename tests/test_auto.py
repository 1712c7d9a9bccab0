"""train.method=auto: greedy ensemble, time limit, determinism, an ensemble model in infer/report,
and a table written by the public writer going through compare, tune, auto and infer."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from raypipe.config import load_config
from raypipe.fusion.ensemble import EnsembleMethod, combine, greedy_ensemble

ray = pytest.mark.ray


# ----------------------------------------------------------------------------- pure
def test_greedy_ensemble_hand_worked_example():
    # one row, y = 0, three "models" predicting +1, -2, +3; score = -(mean prediction - y)^2.
    # step 1: A (-1) beats B (-4), C (-9)            -> {A}        score -1
    # step 2: mean with A 1, with B -0.5, with C 2   -> {A, B}     score -0.25
    # step 3: sums -1+1=0, -1-2, -1+3 over 3         -> {A, A, B}  score 0 (exact)
    # step 4: (0+1)/4=.25 best                       -> {3A, B}    score -0.0625
    # step 5: (1-2)/5=-.2 best                       -> {3A, 2B}   score -0.04
    # step 6: (-1+1)/6=0                             -> {4A, 2B}   score 0, not better than step 3
    y = np.zeros(1)
    preds = [np.array([[1.0]]), np.array([[-2.0]]), np.array([[3.0]])]
    w, history = greedy_ensemble(preds, y, lambda yy, p: -float(((p[:, 0] - yy) ** 2).mean()), size=6)
    np.testing.assert_allclose(w, [2 / 3, 1 / 3, 0])  # the earliest best ensemble, {A, A, B}
    np.testing.assert_allclose(history, [-1, -0.25, 0, -0.0625, -0.04, 0], atol=1e-12)
    np.testing.assert_allclose(combine(preds, w), [[0.0]])


def test_greedy_ensemble_lower_is_better_and_ties_go_to_the_first():
    y = np.array([0.0, 1.0])
    same = np.array([[0.5], [0.5]])
    w, _ = greedy_ensemble([same, same.copy()], y, lambda yy, p: float(np.abs(p[:, 0] - yy).mean()), size=3,
                           higher_is_better=False)
    np.testing.assert_allclose(w, [1, 0])


class _Const(torch.nn.Module):
    def __init__(self, probs, weight):
        super().__init__()
        self.task, self.n_outputs, self.modalities = "binary", 2, ["a", "b"]
        self.p, self.w = torch.tensor(probs), weight

    def predict_with_trace(self, x, mask):
        n = len(mask)
        return {"probabilities": self.p.expand(n, 2), "weight_a": torch.full((n,), self.w),
                "imputed_a": ~mask[:, 0]}


def test_ensemble_method_weights_probabilities_and_takes_traces_from_the_top_member():
    ens = EnsembleMethod([_Const([0.9, 0.1], 0.2), _Const([0.1, 0.9], 0.7)], [1, 3], ["p", "q"])
    out = ens.predict_with_trace({}, torch.tensor([[True, False], [True, True]]))
    # 0.25 * (0.9, 0.1) + 0.75 * (0.1, 0.9) = (0.3, 0.7)
    np.testing.assert_allclose(out["probabilities"].numpy(), [[0.3, 0.7], [0.3, 0.7]], atol=1e-6)
    np.testing.assert_allclose(out["weight_a"].numpy(), [0.7, 0.7])  # member q has the larger weight
    assert out["imputed_a"].tolist() == [False, False]
    with pytest.raises(ValueError, match="weights"):
        EnsembleMethod([_Const([0.5, 0.5], 0.1)], [0], ["p"])


def test_candidates_default_and_overrides():
    from raypipe.fusion.registry import REGISTRY
    from raypipe.tune.auto import candidates

    cfg = load_config(None, [])
    names = [c.label for c in candidates(cfg, "regression")]
    assert names == [n for n, cls in REGISTRY.items() if "regression" in cls.info.tasks]
    assert "pmr" not in names  # pmr is binary/multiclass only
    cfg = load_config(None, ['train.auto.candidates=[concat, {method: late, epochs: 3}]'])
    c = candidates(cfg, "binary")
    assert [x.label for x in c] == ["concat", "late[epochs=3]"] and c[1].train_cfg["epochs"] == 3
    with pytest.raises(ValueError, match="unknown method"):
        candidates(load_config(None, ["train.auto.candidates=[nope]"]), "binary")


def test_choose_model_rules_hand_worked():
    from raypipe.tune.auto import choose_model

    # per-fold scores; best single a (mean 0.90); ensemble mean 0.89, paired differences a - ens
    # = (0.02, 0.00, 0.01): mean 0.01, std 0.01, SE 0.01/sqrt(3) = 0.00577 < 0.01 -> not within one SE
    per_fold = {"a": np.array([0.92, 0.88, 0.90]), "b": np.array([0.90, 0.87, 0.89]),
                "ensemble": np.array([0.90, 0.88, 0.89])}
    assert choose_model(per_fold, True, "best") == "a"
    assert choose_model(per_fold, True, "ensemble_1se") == "a"
    # ensemble (0.91, 0.86, 0.90): differences (0.01, 0.02, 0.00), mean 0.01, std 0.01 -> the same SE: not within;
    # (0.93, 0.85, 0.90): differences (-0.01, 0.03, 0), mean 0.00667, std 0.02082, SE 0.01202 -> within
    per_fold["ensemble"] = np.array([0.93, 0.85, 0.90])
    assert choose_model(per_fold, True, "best") == "a" and choose_model(per_fold, True, "ensemble_1se") == "ensemble"
    # b - a = (-0.02, -0.01, -0.01): mean -0.01333, std 0.00577, SE 0.00333 -> b is not within; a is chosen
    assert choose_model(per_fold, True, "simplest_1se", {"a": 10, "b": 5}) == "a"
    per_fold["b"] = np.array([0.95, 0.84, 0.89])  # a - b = (-0.03, 0.04, 0.01): mean 0.00667, SE 0.02028: within
    assert choose_model(per_fold, True, "simplest_1se", {"a": 10, "b": 5}) == "b"
    # lower is better (e.g. brier): the same rules with the sign turned
    low = {"a": np.array([0.10, 0.12]), "ensemble": np.array([0.11, 0.12])}  # d = (0.01, 0): mean 0.005, SE 0.005
    assert choose_model(low, False, "best") == "a" and choose_model(low, False, "ensemble_1se") == "ensemble"
    with pytest.raises(ValueError, match="select rule"):
        choose_model(low, False, "nope")


def test_refit_runner_follows_the_chosen_candidates_own_settings():
    from raypipe.tune.auto import Candidate, candidates, refit_runner

    cfg = load_config(None, ["train.auto.candidates=[concat, {method: late, num_workers: 2}, "
                             "{method: sum, use_gpu: true}]"])
    cands = {c.label: c for c in candidates(cfg, "binary")}
    two, gpu = cands["late[num_workers=2]"], cands["sum[use_gpu=True]"]
    assert cfg.train.num_workers == 1 and not cfg.train.use_gpu  # the base settings alone would say tasks
    assert refit_runner([cands["concat"]]) == "tasks"
    assert refit_runner([two]) == "ray_train" and refit_runner([cands["concat"], two]) == "ray_train"
    assert refit_runner([cands["concat"], gpu]) == "ray_train"
    # a hand-made candidate: only its own train settings count
    assert refit_runner([Candidate("x", "concat", {"num_workers": 2, "use_gpu": False})]) == "ray_train"
    assert refit_runner([Candidate("x", "concat", {"num_workers": 1, "use_gpu": False})]) == "tasks"


# ----------------------------------------------------------------------------- Ray
def _frame(n=90, seed=3):
    """A pandas frame with one column per modality (lists; None where absent), 3 classes."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    a = np.eye(3)[y] @ rng.standard_normal((3, 6)) + 0.8 * rng.standard_normal((n, 6))
    b = np.eye(3)[y] @ rng.standard_normal((3, 4)) + 1.2 * rng.standard_normal((n, 4))
    df = pd.DataFrame({"sample_id": [f"s{i:03d}" for i in range(n)], "label": y, "site": ["x", "y", "z"][0:1] * n})
    df["imaging"] = [None if i % 7 == 0 else r.tolist() for i, r in enumerate(a)]
    df["notes"] = [None if i % 5 == 1 and i % 7 else r.tolist() for i, r in enumerate(b)]
    return df


@pytest.fixture(scope="module")
def user_table(tmp_path_factory):
    from raypipe.tables import write_embeddings

    return write_embeddings(str(tmp_path_factory.mktemp("byo") / "emb"), _frame(), task="multiclass")


FAST = ["train.epochs=2", "train.hidden_dim=8", "train.batch_size=16", "train.patience=2", "ray.progress_bars=false"]


def _auto_cfg(tmp_path, table, *extra):
    return load_config(None, [f"run.out_dir={tmp_path}", f"train.input={table}", "train.method=auto",
                              "train.auto.folds=2", *FAST, *extra])


@ray
def test_auto_is_deterministic_and_the_ensemble_is_scored_on_the_folds(ray_session, user_table, tmp_path):
    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.tune.auto import cross_validate

    table = read_embeddings(user_table)
    task, _ = infer_task(table.y)
    boards = []
    for run in ("a", "b"):
        cfg = _auto_cfg(tmp_path / run, user_table, "train.auto.candidates=[concat, late, sum]")
        s = cross_validate(cfg, table, task, "accuracy", True, str(tmp_path / run / "auto"))
        boards.append(pd.read_csv(s["leaderboard"]).drop(columns=["fit_seconds"]))
    pd.testing.assert_frame_equal(boards[0], boards[1])  # same config and seed: same leaderboard and choice
    # where the time went: every part named, and each candidate's fits used some CPU
    assert {"prepare", "search", "fits", "fits_summed", "fits_cpu_summed", "ensemble", "total"} <= set(s["seconds"])
    assert set(s["fit_cpu_seconds"]) == {"concat", "late", "sum"} and min(s["fit_cpu_seconds"].values()) > 0
    b = boards[0].set_index("candidate")
    assert set(b.index) == {"concat", "late", "sum", "ensemble"} and (b.status == "ok").all()
    assert b.loc["ensemble", "members"]
    for c in b.index:  # the mean and the ddof=1 std of the per-fold scores
        folds = np.array(json.loads(b.loc[c, "folds"]), float)
        assert b.loc[c, "accuracy_mean"] == pytest.approx(folds.mean(), abs=1e-6)
        assert b.loc[c, "accuracy_std"] == pytest.approx(folds.std(ddof=1), abs=1e-6)
    assert b["rank"].tolist() == [1, 2, 3, 4] and np.isnan(b.iloc[0][b.columns[b.columns.str.startswith("p_vs_")][0]])


@ray
@pytest.mark.slow  # two Tune searches: 214 s wall at load 60 on the shared 2-core VM (Tune's loop waits)
def test_auto_tune_trials_take_each_candidates_hyperparameters_from_the_search(ray_session, user_table, tmp_path):
    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.tune.auto import cross_validate

    table = read_embeddings(user_table)
    task, _ = infer_task(table.y)
    runs = []
    for run in ("a", "b"):
        # the candidates' own width is 8 (FAST); the search may only pick 12 or 16
        cfg = _auto_cfg(tmp_path / run, user_table, "train.auto.candidates=[concat, late]", "train.auto.tune_trials=2",
                        "tune.space={hidden_dim: [choice, [12, 16]], lr: [choice, [0.001, 0.02]]}")
        out = tmp_path / run / "auto"
        s = cross_validate(cfg, table, task, "accuracy", True, str(out))
        runs.append((s, pd.read_csv(s["leaderboard"]).drop(columns=["fit_seconds"]),
                     pd.read_csv(out / "search.csv").drop(columns=["trial"])))
    s, board, search = runs[0]
    pd.testing.assert_frame_equal(board, runs[1][1])  # same seed: same search, leaderboard and choice
    pd.testing.assert_frame_equal(search, runs[1][2])
    assert (search.groupby("candidate").size() == 2).all() and (search["folds_done"] == 2).all()
    board = board.set_index("candidate")
    for label in ("concat", "late"):
        trials = search[search["candidate"] == label].reset_index(drop=True)
        best = trials.iloc[int(trials["cv_mean"].to_numpy().argmax())]  # first of equal bests
        chosen = s["search"][label]["params"]
        assert chosen == {"hidden_dim": int(best["hidden_dim"]), "lr": float(best["lr"])}
        assert chosen["hidden_dim"] in (12, 16)
        assert s["_candidates"][label].train_cfg["hidden_dim"] == chosen["hidden_dim"]
        assert s["_candidates"][label].train_cfg["lr"] == chosen["lr"]
        assert json.loads(board.loc[label, "params"]) == chosen
        # the leaderboard's fits are the best trial's fits (same fold function, params and seed)
        np.testing.assert_allclose(json.loads(board.loc[label, "folds"]), json.loads(best["fold_scores"]),
                                   atol=1e-6)


@ray
def test_auto_time_limit_skips_what_cannot_finish(ray_session, user_table, tmp_path):
    from raypipe.tune.auto import run_auto

    cfg = _auto_cfg(tmp_path, user_table, "train.auto.time_limit=30",
                    "train.auto.candidates=[concat, {method: late, epochs: 1000000, patience: 1000000}]")
    summary = run_auto(cfg, refit=False)
    assert list(summary["skipped"]) == ["late[epochs=1000000,patience=1000000]"]
    assert "time limit" in summary["skipped"]["late[epochs=1000000,patience=1000000]"]
    board = pd.read_csv(summary["leaderboard"])
    assert board.set_index("candidate").loc["late[epochs=1000000,patience=1000000]", "status"].startswith("skipped")
    assert summary["chosen"] == "concat"  # what finished is what is chosen from; no ensemble of one


@ray
def test_byo_table_through_compare_tune_auto_and_infer(ray_session, user_table, tmp_path):
    from raypipe.cli import main

    common = ["--out-dir", str(tmp_path), "--input", user_table, *sum((["--set", s] for s in FAST), [])]
    assert main(["compare", *common, "--methods", "concat,late", "--folds", "2", "--metric", "macro_f1"]) == 0
    table = pd.read_csv(tmp_path / "compare" / "table.csv")
    assert {"macro_f1_mean", "macro_f1_std", "accuracy_mean"} <= set(table.columns)
    assert main(["tune", *common, "--folds", "2", "--metric", "accuracy", "--set", "tune.num_samples=1",
                 "--set", "tune.space={hidden_dim: 8, omnifuse.depth: 1}"]) == 0
    assert pd.read_csv(tmp_path / "tune" / "results.csv")["cv_mean"].between(0, 1).all()
    assert main(["train", *common, "--method", "auto", "--metric", "accuracy", "--set", "train.auto.folds=2",
                 "--set", "train.auto.candidates=[concat, late]"]) == 0
    run_dir = tmp_path / "train" / "auto"
    summary = json.loads((run_dir / "auto_summary.json").read_text())
    assert summary["metric"] == "accuracy" and os.path.isfile(run_dir / "model.pt")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["auto"]["chosen"] == summary["chosen"]
    assert main(["infer", "--out-dir", str(tmp_path), "--checkpoint", str(run_dir), "--input", user_table,
                 "--set", "ray.progress_bars=false"]) == 0
    pred = pd.read_parquet(tmp_path / "predictions")
    assert len(pred) == 90 and set(pred.prediction.unique()) <= {0.0, 1.0, 2.0}
    assert main(["report", str(run_dir)]) == 0


@ray
def test_refit_is_deterministic_and_independent_of_the_process(ray_session, user_table, tmp_path):
    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.train.trainer import assign_splits, model_meta
    from raypipe.tune.auto import _cfg_for, _refit_ensemble, _refit_fit, _refit_single, candidates

    cfg = _auto_cfg(tmp_path, user_table, "train.auto.candidates=[concat, late]")
    table = read_embeddings(user_table)
    task, n_out = infer_task(table.y)
    cands = {c.label: c for c in candidates(cfg, task)}
    states, docs = [], []
    # same config and seed: the same members, bit for bit, and the same test scores, whichever is submitted first
    for run, cost in (("a", None), ("b", {"late": 10.0, "concat": 1.0})):
        res = _refit_ensemble(cfg, table, task, str(tmp_path / run), {"concat": 0.5, "late": 0.5}, cands,
                              runner="tasks", cost=cost)
        assert res["ok"]
        states.append(torch.load(tmp_path / run / "model.pt", weights_only=True))
        docs.append(json.loads((tmp_path / run / "metrics.json").read_text())["test"])
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert docs[0] == docs[1]
    # a single method's refit is the same fit as that member's
    _refit_single(cfg, table, task, str(tmp_path / "single"), "concat", cands, runner="tasks")
    single = torch.load(tmp_path / "single" / "model.pt", weights_only=True)
    member = torch.load(tmp_path / "a" / "members" / "concat" / "model.pt", weights_only=True)
    assert all(torch.equal(single[k], member[k]) for k in member)
    # its config.yaml holds the candidate's settings, not the auto config that chose it
    written = yaml.safe_load((tmp_path / "single" / "config.yaml").read_text())
    assert written["train"]["method"] == "concat" and written["train"]["lr"] == cands["concat"].train_cfg["lr"]
    # and the Ray task's fit equals the same function run here, in the test's own process
    split = assign_splits(table, cfg)
    rows = split != "test"
    threads = torch.get_num_threads()
    try:
        meta = model_meta(_cfg_for(cfg, cands["concat"], str(tmp_path / "x")), table, task, n_out)
        here = _refit_fit(meta, ({m: v[rows] for m, v in table.x.items()}, table.mask[rows], table.y[rows]),
                          np.flatnonzero(split[rows] == "train"), np.flatnonzero(split[rows] == "val"), cfg.run.seed)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(here["state"][k], member[k]) for k in member)


@ray
def test_a_failed_refit_task_cancels_the_others(ray_session, user_table, tmp_path):
    import time

    import ray as ray_mod

    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.tune.auto import Candidate, _refit_tasks, candidates

    cfg = _auto_cfg(tmp_path, user_table, "train.auto.candidates=[{method: late, epochs: 1000000, patience: 1000000}]")
    table = read_embeddings(user_table)
    task, _ = infer_task(table.y)
    (endless,) = candidates(cfg, task)
    bad = Candidate("bad", "nope", {**endless.train_cfg, "method": "nope"})  # fails when the task builds it
    dirs = {endless.label: str(tmp_path / "endless"), "bad": str(tmp_path / "bad")}  # the endless one collected first
    with pytest.raises(Exception, match="unknown fusion method"):
        _refit_tasks(cfg, table, task, dirs, {endless.label: endless, "bad": bad})
    # the endless fit (1 CPU) was cancelled: the cluster's CPUs all come back (it would never end by itself)
    total = ray_mod.cluster_resources()["CPU"]
    for _ in range(120):
        if ray_mod.available_resources().get("CPU", 0) == total:
            break
        time.sleep(0.5)
    assert ray_mod.available_resources().get("CPU", 0) == total
    assert not os.path.exists(tmp_path / "endless" / "model.pt")


@ray
@pytest.mark.parametrize("runner", ["tasks", "ray_train"])
def test_infer_and_report_with_an_ensemble_model(ray_session, user_table, tmp_path, runner):
    from raypipe.infer.pipeline import run_infer
    from raypipe.report.html import write_report
    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.train.trainer import load_trained
    from raypipe.tune.auto import _refit_ensemble, candidates

    cfg = _auto_cfg(tmp_path, user_table, "train.auto.candidates=[concat, late]")
    table = read_embeddings(user_table)
    task, _ = infer_task(table.y)
    run_dir = str(tmp_path / "train" / "auto")
    cands = {c.label: c for c in candidates(cfg, task)}
    res = _refit_ensemble(cfg, table, task, run_dir, {"concat": 0.25, "late": 0.75}, cands, runner=runner)
    assert res["ok"]
    # the reported test AUROC is that of the saved test predictions (macro one-vs-rest, computed here by sklearn)
    saved = pd.read_parquet(os.path.join(run_dir, "predictions_test.parquet"))
    assert res["test_auroc"] == pytest.approx(
        roc_auc_score(saved["label"], np.stack(saved["probabilities"].to_numpy()), multi_class="ovr",
                      average="macro"), abs=1e-6)
    meta = json.loads(open(os.path.join(run_dir, "model_meta.json")).read())
    assert meta["method"] == "ensemble" and [m["name"] for m in meta["members"]] == ["concat", "late"]
    out = run_infer(cfg.model_copy(update={"infer": cfg.infer.model_copy(update={
        "checkpoint": run_dir, "input": user_table, "out": str(tmp_path / "pred")})}))
    pred = pd.read_parquet(out["predictions"]).set_index("sample_id").loc[table.sample_id]
    # the saved ensemble predicts 0.25 x concat + 0.75 x late, each member loaded from its own run
    from raypipe.train import loop

    probs = []
    for name in ("concat", "late"):
        method, _ = load_trained(os.path.join(run_dir, "members", name))
        probs.append(loop.make_predict_fn(method, task)(table.x, table.mask)["probabilities"])
    np.testing.assert_allclose(np.stack(pred.probabilities.to_numpy()), 0.25 * probs[0] + 0.75 * probs[1],
                               atol=1e-5)
    assert write_report(run_dir)["ok"]


@pytest.mark.parametrize("task, metric", [("binary", "auroc"), ("binary", "brier"), ("multiclass", "accuracy"),
                                          ("regression", "r2"), ("regression", "mae")])
def test_fast_selection_scores_equal_the_reported_metrics(task, metric):
    from raypipe.train.metrics import compute_metrics
    from raypipe.tune.auto import _metric_fn

    rng = np.random.default_rng(0)
    n = 57
    if task == "binary":
        y = rng.integers(0, 2, n).astype(float)
        p1 = np.round(rng.random(n), 1)  # ties in the scores
        p = np.c_[1 - p1, p1]
    elif task == "multiclass":
        y = rng.integers(0, 3, n).astype(float)
        p = rng.dirichlet(np.ones(3), n)
    else:
        y = rng.standard_normal(n)
        p = (y + rng.standard_normal(n))[:, None]
    assert _metric_fn(task, metric)(y, p) == pytest.approx(compute_metrics(task, y, p)[metric], abs=1e-12)


# ----------------------------------------------------------------------------- train.auto.refit: bag
def test_fold_task_state_flag_is_off_by_default_and_changes_no_result():
    """compare and tune call fold_task without the flag: no fold model in their rows; with the flag the same fit."""
    from raypipe.train.splits import kfold_assignments
    from raypipe.tune.folds import fold_task

    rng = np.random.default_rng(0)
    n = 40
    y = (np.arange(n) % 2).astype(float)
    x = {"a": (y[:, None] + rng.standard_normal((n, 3))).astype(np.float32),
         "b": rng.standard_normal((n, 2)).astype(np.float32)}
    mask = np.ones((n, 2), bool)
    ids = np.array([f"r{i}" for i in range(n)])
    data = (x, mask, y, ids, {"a": [3], "b": [2]})
    folds = kfold_assignments(ids, y, k=2, seed=0)
    tc = load_config(None, ["train.epochs=2", "train.hidden_dim=8", "train.batch_size=8"]).train.model_dump(mode="json")
    threads = torch.get_num_threads()
    try:
        plain = fold_task("concat", {}, tc, data, 0, folds, "binary", ["a", "b"], 0, patterns=False,
                          return_predictions=True)
        with_state = fold_task("concat", {}, tc, data, 0, folds, "binary", ["a", "b"], 0, patterns=False,
                               return_predictions=True, return_state=True)
    finally:
        torch.set_num_threads(threads)
    assert "fold_model" not in plain
    fm = with_state.pop("fold_model")
    assert set(fm) == {"state", "best_epoch", "epochs"} and 1 <= fm["best_epoch"] <= fm["epochs"] <= 2
    np.testing.assert_array_equal(plain.pop("oof"), with_state.pop("oof"))
    plain.pop("seconds"), with_state.pop("seconds")
    assert plain == with_state
    assert load_config(None, []).train.auto.refit == "bag"  # auto's default keeps the fold models (flag on there)


def _hand_bag(run_dir, table, cfg, weights, task):
    """The bagged prediction computed here, one fold model at a time: each chosen candidate's k fold models
    fitted again by fold_task in this process (the CV's folds read from folds.parquet), each predicting every
    row of ``table``; per candidate their plain mean, then weighted by the candidate's ensemble weight."""
    from raypipe.train.trainer import assign_splits, build_from_meta
    from raypipe.tune.auto import candidates
    from raypipe.tune.folds import fold_task

    meta = json.loads(open(os.path.join(run_dir, "model_meta.json")).read())
    folds_df = pd.read_parquet(os.path.join(run_dir, "folds.parquet"))
    rows = assign_splits(table, cfg) != "test"
    sub = table.take(rows)
    assert folds_df["sample_id"].tolist() == [str(s) for s in sub.sample_id]
    folds = folds_df["fold"].to_numpy()
    data = (sub.x, sub.mask, sub.y, sub.sample_id, {m: list(s) for m, s in sub.shapes.items()})
    cands = {c.label: c for c in candidates(cfg, task)}
    threads = torch.get_num_threads()
    total, states, oof = 0.0, {}, {}
    try:
        for label, w in weights.items():
            per_fold = []
            for f in range(int(folds.max()) + 1):
                r = fold_task(cands[label].method, {}, cands[label].train_cfg, data, f, folds, task, sub.modalities,
                              cfg.run.seed, patterns=False, return_predictions=True, n_outputs=meta["n_outputs"],
                              return_state=True)
                oof[f"{label}/fold{f}"] = r["oof"]
                model = build_from_meta(next(m["meta"] for m in meta["members"] if m["name"] == f"{label}/fold{f}"))
                model.load_state_dict(r["fold_model"]["state"])
                model.eval()
                states[f"{label}/fold{f}"] = r["fold_model"]["state"]
                with torch.no_grad():
                    per_fold.append(np.concatenate([
                        model.predict_with_trace({m: torch.as_tensor(v[i:i + 1]) for m, v in table.x.items()},
                                                 torch.as_tensor(table.mask[i:i + 1]))["probabilities"].numpy()
                        for i in range(len(table))]))
            total = total + w * np.mean(per_fold, axis=0)
    finally:
        torch.set_num_threads(threads)
    return total, states, (oof, sub, folds)


def _assert_saved_fold_models_predict_their_oof(run_dir, task, oof, sub, folds):
    """Each saved member ``<c>/fold<f>``, as `raypipe infer` loads it (rebuilt from model_meta.json), predicts its
    held-out fold as fold_task's own model did (its out-of-fold predictions): a constructor setting the meta gets
    wrong (one the state dict does not carry) would change them."""
    from raypipe.fusion.ensemble import load_model
    from raypipe.train import loop

    model, _ = load_model(run_dir)
    assert sorted(model.names) == sorted(oof)
    for name, member in zip(model.names, model.members):
        held = folds == int(name.rsplit("/fold", 1)[1])
        got = loop.make_predict_fn(member, task)({m: v[held] for m, v in sub.x.items()}, sub.mask[held])
        np.testing.assert_allclose(got["probabilities"], oof[name], atol=1e-5, err_msg=name)


@ray
def test_bag_predicts_the_mean_of_its_fold_models_in_train_infer_and_report(ray_session, user_table, tmp_path):
    from raypipe.infer.pipeline import run_infer
    from raypipe.report.html import write_report
    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.tune.auto import run_auto

    table = read_embeddings(user_table)
    task, _ = infer_task(table.y)
    saved, docs = [], []
    for run in ("a", "b"):  # determinism: same config and seed, the same bag bit for bit, the same test scores
        cfg = _auto_cfg(tmp_path / run, user_table, "train.auto.candidates=[concat, late]", "train.auto.refit=bag",
                        "train.auto.metric=accuracy")
        res = run_auto(cfg)
        run_dir = res["run_dir"]
        saved.append(torch.load(os.path.join(run_dir, "model.pt"), weights_only=True))
        docs.append(json.loads(open(os.path.join(run_dir, "metrics.json")).read()))
    assert saved[0].keys() == saved[1].keys() and all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    assert docs[0]["test"] == docs[1]["test"]
    summary = json.loads(open(os.path.join(run_dir, "auto_summary.json")).read())
    assert summary["refit"] == "bag" and docs[1]["refit"] == "bag" and docs[1]["auto"]["refit"] == "bag"
    # whichever the CV chose (an ensemble of bags or one bag: that depends on the data and the machine's torch),
    # the bag holds the chosen candidates' fold models; a fixed ensemble of two bags: test_bag_of_two_candidates_*
    weights = summary["ensemble_weights"] if summary["chosen"] == "ensemble" else {summary["chosen"]: 1.0}
    assert set(weights) <= {"concat", "late"} and sum(weights.values()) == pytest.approx(1.0)
    meta = json.loads(open(os.path.join(run_dir, "model_meta.json")).read())
    assert meta["method"] == "ensemble" and meta["refit"] == "bag"
    # weight w_c / k on each of the k = 2 fold models of member c
    assert {m["name"]: m["weight"] for m in meta["members"]} == pytest.approx(
        {f"{c}/fold{f}": w / 2 for c, w in weights.items() for f in (0, 1)})
    assert not os.path.exists(os.path.join(run_dir, "members"))  # nothing refitted
    expected, states, (oof, sub, folds) = _hand_bag(run_dir, table, cfg, weights, task)
    _assert_saved_fold_models_predict_their_oof(run_dir, task, oof, sub, folds)
    # the saved members are the CV's fold models (fold_task in this process gives the same weights)
    for i, m in enumerate(meta["members"]):
        for k, v in states[m["name"]].items():
            assert torch.equal(saved[1][f"members.{i}.{k}"], v), (m["name"], k)
    # the test predictions written by train, and raypipe infer's over every row, are the hand-made bag's
    test_pred = pd.read_parquet(os.path.join(run_dir, "predictions_test.parquet"))
    by_id = dict(zip(table.sample_id.tolist(), range(len(table))))
    np.testing.assert_allclose(np.stack(test_pred.probabilities.to_numpy()),
                               expected[[by_id[s] for s in test_pred.sample_id]], atol=1e-5)
    out = run_infer(cfg.model_copy(update={"infer": cfg.infer.model_copy(update={
        "checkpoint": run_dir, "input": user_table, "out": str(tmp_path / "pred")})}))
    pred = pd.read_parquet(out["predictions"]).set_index("sample_id").loc[table.sample_id]
    np.testing.assert_allclose(np.stack(pred.probabilities.to_numpy()), expected, atol=1e-5)
    assert write_report(run_dir)["ok"]
    assert "bagged" in open(os.path.join(run_dir, "report.html")).read()
    # the test metrics (the 2 x 2 fold models predicted in parallel Ray tasks) equal the saved model's evaluated
    # here one member after another (EnsembleMethod.predict_with_trace)
    from raypipe.fusion.ensemble import load_model
    from raypipe.train import loop
    from raypipe.train.evaluate import evaluate_test
    from raypipe.train.trainer import assign_splits

    model, _ = load_model(run_dir)
    test = table.take(assign_splits(table, cfg) == "test")
    here, _ = evaluate_test(loop.make_predict_fn(model, task), test.x, test.mask, test.y, task, table.modalities,
                            seed=cfg.run.seed)
    written = docs[1]["test"]
    assert [p["pattern"] for p in written["patterns"]] == [p["pattern"] for p in here["patterns"]]
    for a, b in [(written["natural"], here["natural"]), *zip(written["patterns"], here["patterns"]),
                 *zip(written["missing_rate_curve"], here["missing_rate_curve"])]:
        assert {k: v for k, v in a.items() if k != "pattern"} == pytest.approx(
            {k: v for k, v in b.items() if k != "pattern"}, abs=1e-6, nan_ok=True)


@ray
def test_refit_full_keeps_no_fold_models_and_refits_one_model(ray_session, user_table, tmp_path):
    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.tune.auto import cross_validate, run_auto

    cfg = _auto_cfg(tmp_path, user_table, "train.auto.candidates=[concat]", "train.auto.refit=full")
    table = read_embeddings(user_table)
    task, _ = infer_task(table.y)
    assert "_fold_models" not in cross_validate(cfg, table, task, "accuracy", True, str(tmp_path / "cv"))
    res = run_auto(cfg)
    meta = json.loads(open(os.path.join(res["run_dir"], "model_meta.json")).read())
    summary = json.loads(open(os.path.join(res["run_dir"], "auto_summary.json")).read())
    assert meta["method"] == "concat" and "refit" not in meta  # the refitted single method, not a bag
    assert summary["refit"] == "full" and summary["refit_runner"] == "tasks" and summary["chosen"] == "concat"


def test_save_ensemble_never_leaves_a_model_beside_another_models_meta(tmp_path, monkeypatch):
    """model.pt and model_meta.json are written to temporary names first: a crash while writing the new pair
    leaves the old pair as it was (or, between the renames, no meta), never the new model with the old meta."""
    from raypipe.fusion import ensemble as E

    old = EnsembleMethod([_Const([0.9, 0.1], 0.2)], [1], ["old"])
    E.save_ensemble(str(tmp_path), old, {"method": "ensemble", "members": [{"name": "old"}]})
    before = {f: (tmp_path / f).read_bytes() for f in ("model.pt", "model_meta.json")}
    new = EnsembleMethod([_Const([0.1, 0.9], 0.7), _Const([0.5, 0.5], 0.1)], [1, 1], ["p", "q"])

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(E.json, "dump", crash)  # the meta's write fails after the model's
    with pytest.raises(OSError, match="disk full"):
        E.save_ensemble(str(tmp_path), new, {"method": "ensemble", "members": [{"name": "p"}, {"name": "q"}]})
    assert {f: (tmp_path / f).read_bytes() for f in ("model.pt", "model_meta.json")} == before
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "model_meta.json"]  # no temporary file left
    monkeypatch.undo()
    E.save_ensemble(str(tmp_path), new, {"method": "ensemble", "members": [{"name": "p"}, {"name": "q"}]})
    assert json.loads((tmp_path / "model_meta.json").read_text())["members"][1]["name"] == "q"
    assert set(torch.load(tmp_path / "model.pt", weights_only=True)) == {"weights"}  # _Const has no parameters


def test_evaluate_test_refuses_predictions_made_for_other_passes():
    """predictions made elsewhere carry each pass's identity: another seed or other rates of the same count
    (so the same number of passes) are refused, not scored against the wrong masks."""
    from raypipe.train.evaluate import evaluate_test, evaluation_inputs, predict_inputs

    rng = np.random.default_rng(1)
    n = 30
    x = {"a": rng.standard_normal((n, 2)).astype(np.float32), "b": rng.standard_normal((n, 2)).astype(np.float32)}
    mask = np.ones((n, 2), bool)
    mask[::4, 1] = False
    y = (np.arange(n) % 2).astype(float)

    def predict(xx, m):  # depends on the mask, so other masks give other scores
        p1 = 1 / (1 + np.exp(-(xx["a"][:, 0] * m[:, 0] + xx["b"][:, 0] * m[:, 1])))
        return {"probabilities": np.c_[1 - p1, p1]}

    args = (predict, x, mask, y, "binary", ["a", "b"])
    rates = (0.1, 0.5)
    own = predict_inputs(predict, x, evaluation_inputs(mask, ["a", "b"], seed=0, rates=rates))
    got, _ = evaluate_test(*args, seed=0, rates=rates, predictions=own)
    assert got == evaluate_test(*args, seed=0, rates=rates)[0]  # the right predictions: the same as made here
    other_seed = predict_inputs(predict, x, evaluation_inputs(mask, ["a", "b"], seed=7, rates=rates))
    assert len(other_seed) == len(own)
    with pytest.raises(ValueError, match=r"prediction 0 was made for evaluation pass .*seed \(0\)"):
        evaluate_test(*args, seed=0, rates=rates, predictions=other_seed)
    other_rates = predict_inputs(predict, x, evaluation_inputs(mask, ["a", "b"], seed=0, rates=(0.2, 0.9)))
    assert len(other_rates) == len(own)
    with pytest.raises(ValueError, match=r"prediction 4 was made for evaluation pass \('rate', 0.2"):
        evaluate_test(*args, seed=0, rates=rates, predictions=other_rates)
    bare = [{k: v for k, v in o.items() if k != "pass"} for o in own]  # no identity at all: refused too
    with pytest.raises(ValueError, match="was made for evaluation pass None"):
        evaluate_test(*args, seed=0, rates=rates, predictions=bare)


def _fold_model_refs(table, cfg, task, labels):
    """Each candidate's CV fold models made here by fold_task (return_state) on the folds auto would use,
    put in the object store as run_fits leaves them; and each fold's out-of-fold predictions."""
    import ray as ray_mod

    from raypipe.train.splits import kfold_assignments
    from raypipe.train.trainer import assign_splits
    from raypipe.tune.auto import candidates
    from raypipe.tune.folds import fold_task, n_outputs_for

    sub = table.take(assign_splits(table, cfg) != "test")
    k = cfg.train.auto.folds
    folds = kfold_assignments(sub.sample_id, sub.y, k=k, seed=cfg.run.seed)
    data = (sub.x, sub.mask, sub.y, sub.sample_id, {m: list(s) for m, s in sub.shapes.items()})
    cands = {c.label: c for c in candidates(cfg, task)}
    refs, rows = {}, {}
    threads = torch.get_num_threads()
    try:
        for label in labels:
            for f in range(k):
                r = fold_task(cands[label].method, {}, cands[label].train_cfg, data, f, folds, task, sub.modalities,
                              cfg.run.seed, patterns=False, return_predictions=True,
                              n_outputs=n_outputs_for(task, table.y), return_state=True)
                refs.setdefault(label, []).append(ray_mod.put(r.pop("fold_model")))
                rows.setdefault(label, []).append(r)
    finally:
        torch.set_num_threads(threads)
    return cands, refs, rows, sub, folds


@ray
def test_a_bag_saved_over_a_full_run_leaves_none_of_its_files(ray_session, user_table, tmp_path):
    """A refitted ensemble (members/, history.json, omnifuse's projection.parquet) then a bag of concat (none of
    those) in the same run directory: the report must not find the refit's curve, projection or members."""
    from raypipe.report.html import write_report
    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.tune.auto import _refit_ensemble, _save_bag

    cfg = _auto_cfg(tmp_path, user_table, "train.auto.candidates=[concat, omnifuse]")
    table = read_embeddings(user_table)
    task, _ = infer_task(table.y)
    run_dir = tmp_path / "train" / "auto"
    run_dir.mkdir(parents=True)
    board = "rank,candidate,accuracy_mean,accuracy_std\n1,concat,0.5,0.1\n"  # the CV's own file: kept
    (run_dir / "leaderboard.csv").write_text(board)
    cands, refs, _, _, _ = _fold_model_refs(table, cfg, task, ["concat"])
    _refit_ensemble(cfg, table, task, str(run_dir), {"omnifuse": 0.75, "concat": 0.25}, cands, runner="tasks")
    write_report(str(run_dir))
    full = set(os.listdir(run_dir))
    assert {"members", "history.json", "projection.parquet", "report.html", "model.pt"} <= full  # what a refit leaves
    page = (run_dir / "report.html").read_text()
    assert "<h2>Training history</h2>" in page and "<h2>Observed vs. imputed embeddings</h2>" in page
    _save_bag(cfg, table, task, str(run_dir), {"concat": 1.0}, cands, refs, 2, "concat")
    # exactly what a bag writes, plus the CV's file; nothing of the refit (nor a leftover temporary folder)
    assert set(os.listdir(run_dir)) == {"leaderboard.csv", "model.pt", "model_meta.json", "split.parquet",
                                        "metrics.json", "predictions_test.parquet", "config.yaml"}
    assert json.loads((run_dir / "model_meta.json").read_text())["refit"] == "bag"
    assert (run_dir / "leaderboard.csv").read_text() == board
    write_report(str(run_dir))
    page = (run_dir / "report.html").read_text()
    assert "<h2>Training history</h2>" not in page and "<h2>Observed vs. imputed embeddings</h2>" not in page


def _task_table(path, task, n=80, seed=5):
    """An embeddings table (public writer) of a regression or 3-label multilabel task, some modalities absent."""
    from raypipe.tables import write_embeddings

    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 3))
    a = z @ rng.standard_normal((3, 6)) + 0.5 * rng.standard_normal((n, 6))
    b = z @ rng.standard_normal((3, 4)) + 0.8 * rng.standard_normal((n, 4))
    y = z[:, 0] + 0.5 * z[:, 1] if task == "regression" else (z > 0).astype(float)
    masks = {"imaging": np.arange(n) % 7 != 0, "notes": ~((np.arange(n) % 5 == 1) & (np.arange(n) % 7 != 0))}
    return write_embeddings(str(path), {"imaging": a, "notes": b}, [f"s{i:03d}" for i in range(n)], y, masks=masks,
                            task=task)


@ray
@pytest.mark.parametrize("task", ["regression", "multilabel"])
def test_bag_of_two_candidates_is_the_weighted_mean_of_fold_models_built_here(ray_session, tmp_path, task):
    """An ensemble of two bags (weights 0.4 / 0.6 fixed, not chosen by the CV) on a regression and a multilabel
    table: the test predictions are 0.4 x mean(concat's 2 fold models) + 0.6 x mean(late's), each fold model
    rebuilt here through the registry (as fold_task builds it, not from model_meta.json); each saved member's
    var_y is its own fit rows' label variance (regression); each predicts its held-out fold as fold_task did."""
    from sklearn.metrics import r2_score

    from raypipe.config import TrainConfig
    from raypipe.fusion.base import ModalitySpec
    from raypipe.fusion.ensemble import load_model
    from raypipe.fusion.registry import build_method
    from raypipe.train import loop
    from raypipe.train.splits import holdout_mask
    from raypipe.train.tables import infer_task, read_embeddings
    from raypipe.train.trainer import assign_splits
    from raypipe.tune.auto import _save_bag

    emb = _task_table(tmp_path / "emb", task)
    cfg = _auto_cfg(tmp_path, emb, "train.auto.candidates=[concat, late]")
    table = read_embeddings(emb)
    got_task, n_out = infer_task(table.y)
    assert got_task == task
    cands, refs, rows, sub, folds = _fold_model_refs(table, cfg, task, ["concat", "late"])
    import ray as ray_mod

    weights = {"concat": 0.4, "late": 0.6}
    test = table.take(assign_splits(table, cfg) == "test")
    expected, oof, var_y = 0.0, {}, {}
    for label, w in weights.items():
        per_fold = []
        for f, ref in enumerate(refs[label]):
            model = build_method(cands[label].method, [ModalitySpec(m, tuple(sub.shapes[m])) for m in sub.modalities],
                                 task, n_out, TrainConfig.model_validate(cands[label].train_cfg))
            model.load_state_dict(ray_mod.get(ref)["state"])
            model.eval()
            per_fold.append(loop.make_predict_fn(model, task)(test.x, test.mask)["probabilities"])
            oof[f"{label}/fold{f}"] = rows[label][f]["oof"]
            tr = np.flatnonzero(folds != f)  # fold_task's fit rows: the other folds minus its 20 % validation part
            fit = tr[~holdout_mask(sub.sample_id[tr], sub.y[tr], fraction=0.2, seed=cfg.run.seed + f)]
            var_y[f"{label}/fold{f}"] = float(np.var(sub.y[fit])) if task == "regression" else 1.0
        expected = expected + w * np.mean(per_fold, axis=0)
    run_dir = str(tmp_path / "train" / "auto")
    res = _save_bag(cfg, table, task, run_dir, weights, cands, refs, 2, "ensemble")
    saved = pd.read_parquet(os.path.join(run_dir, "predictions_test.parquet"))
    assert saved["sample_id"].tolist() == [str(s) for s in test.sample_id]
    np.testing.assert_allclose(np.stack(saved["probabilities"].to_numpy()).reshape(expected.shape), expected,
                               atol=1e-5)
    if task == "regression":  # the reported R^2 is sklearn's over the hand-made bag's values
        assert res["test_r2"] == pytest.approx(r2_score(test.y, expected[:, 0]), abs=1e-5)
    meta = json.loads(open(os.path.join(run_dir, "model_meta.json")).read())
    assert {m["name"]: m["weight"] for m in meta["members"]} == pytest.approx(
        {f"{c}/fold{f}": w / 2 for c, w in weights.items() for f in (0, 1)})
    assert {m["name"]: m["meta"]["var_y"] for m in meta["members"]} == pytest.approx(var_y, rel=1e-6)
    model, _ = load_model(run_dir)
    assert {n: float(m.var_y) for n, m in zip(model.names, model.members)} == pytest.approx(var_y, rel=1e-6)
    _assert_saved_fold_models_predict_their_oof(run_dir, task, oof, sub, folds)
