"""Why does OmniFuse's imputation help or hurt? Measurements, not guesses (docs/fusion.md, "OmniFuse").

For each data set and missing rate it fits concat and the OmniFuse ablation rows b-e on the
same folds and masks (test AUROC, mean +- std over folds, ddof = 1), then opens the fitted
row-d/e models on the test part and prints:

1. **Imputation error**: for every modality m observed in a test sample, hide it and compare what
   the forward cascade puts in its slot (v'_m) with the encoder's own embedding of the true input
   h_m, as a normalised MSE (1.0 = predicting the training mean of h_m). References: the raw fill
   the cascade starts from (v_m, no imputation), and a ridge regression (RidgeCV) from the other
   slots of v -- exactly the information the cascade has -- fitted on the training part.
2. **What the heads see**: the unimodal head g_m's AUROC on the imputed slice vs on the observed
   slice; the slice's norm relative to the observed one.
3. **Trust**: the label-free DWFuse weight w_m of imputed vs observed slices, and the weight of
   the *other*, observed, modalities when m is imputed vs observed (an imputed slice built from
   the others makes its head confident, which down-weights the modalities it was built from).
4. **Loss terms** during training: the raw size of L_fwd, L_bwd, L_DWFuse, L_TLA in the first
   and the best epoch, and their size times the objective's weights (1, lambda1, lambda2, lambda3).
5. **Time**: mean seconds per epoch (training + validation) of omnifuse and concat, and the ratio.

Data: the synthetic cohort's latent observations rendered as 64-d embeddings
(``raypipe.synth.latent.generate_truth`` + ``raypipe.synth.embeddings.render_embeddings``,
natural availability plus random view dropout), and scikit-learn's breast-cancer data split
into its three natural views (mean / standard error / worst, 10 features each), complete plus
random view dropout. Dropout keeps at least one view per sample and is the same for every method.

    python benchmarks/omnifuse_diagnose.py                           # both data sets, 0/50/90 %
    python benchmarks/omnifuse_diagnose.py --dataset breast_cancer --rates 0.5 --folds 2 --epochs 10
    python benchmarks/omnifuse_diagnose.py --set loss_scale=mean --set absent_fill=mean   # a variant
    python benchmarks/omnifuse_diagnose.py --profile --dataset synth2        # where an epoch's CPU time goes
    python benchmarks/omnifuse_diagnose.py --dataset synth2 --rates 0.5 --rows e --epochs 20 --patience 5 \
        --trace --isolated 40 --set cascade_passes=3   # NMSE per epoch, and of a cascade trained alone

``--set`` keys the installed OmniFuseConfig does not have go to the constructor (``train.method_args``).
``--trace`` prints, for rows d/e, the test-fold NMSE of the cascade and of a ridge fitted on that epoch's
embeddings after every epoch; ``--isolated N`` trains a fresh forward cascade alone for N epochs on the
fitted model's frozen encoders (docs/fusion.md, "Why the cascade does not learn what a ridge finds").

Timings are wall-clock on whatever machine runs this; on a shared machine they are noisy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time

import numpy as np
import torch

from raypipe.config import TrainConfig
from raypipe.fusion.base import ModalitySpec
from raypipe.fusion.registry import build_method
from raypipe.train import loop
from raypipe.train.metrics import compute_metrics
from raypipe.train.splits import holdout_mask, kfold_assignments

ROWS = {  # OmniFuse Table 4 rows (docs/fusion.md); "concat" is row a
    "concat": ("concat", {}),
    "b": ("omnifuse", dict(use_imp_forward=False, use_imp_backward=False, use_tla=False)),
    "c": ("omnifuse", dict(use_imp_forward=False, use_imp_backward=False)),
    "d": ("omnifuse", dict(use_imp_backward=False)),
    "e": ("omnifuse", {}),
}


# ----------------------------------------------------------------------------- data
def load_dataset(name: str, n: int, seed: int):
    """(x {view: (N, d)}, natural availability (N, M) bool, y (N,) float, view names)."""
    if name == "synth":
        from raypipe.synth.embeddings import render_embeddings
        from raypipe.synth.latent import MODALITIES, generate_truth

        truth = generate_truth(n=n, seed=seed)
        x = render_embeddings(truth, dim=64)
        natural = np.stack([truth[f"avail_{m}"].to_numpy() for m in MODALITIES], 1)
        return x, natural, truth["label"].to_numpy().astype(float), list(MODALITIES)
    if name == "synth2":
        from raypipe.synth.embeddings import render_embeddings
        from raypipe.synth.latent2 import MODALITIES as M2, generate_truth as gen2

        truth = gen2(n=n, seed=seed)
        x = render_embeddings(truth, dim=64)
        natural = np.stack([truth[f"avail_{m}"].to_numpy() for m in M2], 1)
        return x, natural, truth["label"].to_numpy().astype(float), list(M2)
    if name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        views = ["mean", "error", "worst"]  # columns 0-9, 10-19, 20-29 (sklearn's feature order)
        x = {v: data.data[:, 10 * i:10 * (i + 1)].astype(np.float32) for i, v in enumerate(views)}
        return x, np.ones((len(data.target), 3), bool), data.target.astype(float), views
    raise ValueError(f"unknown dataset {name!r} (synth, synth2, breast_cancer)")


def drop_at_random(mask: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """Drop each available view with probability ``rate``, keeping at least one per sample."""
    rng = np.random.default_rng(seed)
    out = mask & (rng.random(mask.shape) >= rate)
    for i in np.flatnonzero(~out.any(axis=1)):
        out[i, rng.choice(np.flatnonzero(mask[i]))] = True
    return out


# ----------------------------------------------------------------------------- fitting
def train_config(args, switches: dict, name: str = "omnifuse") -> TrainConfig:
    """OmniFuse settings: ``--set`` overrides under the row's switches; a key the installed OmniFuseConfig
    does not (yet) have goes to the constructor through ``train.method_args`` (options under trial)."""
    from raypipe.config import OmniFuseConfig

    omni = {"depth": args.depth, **args.omni, **switches}
    known = {k: v for k, v in omni.items() if k in OmniFuseConfig.model_fields}
    extra = {k: v for k, v in omni.items() if k not in known}
    return TrainConfig(hidden_dim=args.hidden, omnifuse=known, method_args=extra if name == "omnifuse" else {})


def fit_one(row, x, y, mask, views, tr_idx, te_idx, args, seed, trace=None):
    """``trace``: a list that gets, after every epoch, the test-fold imputation NMSE per modality
    (:func:`imputation_nmse`) of the model as it is then (rows d/e only)."""
    name, switches = ROWS[row]
    specs = [ModalitySpec(v, (x[v].shape[1],)) for v in views]
    cfg = train_config(args, switches, name)
    torch.manual_seed(seed)
    method = build_method(name, specs, "binary", 2, cfg)
    val = holdout_mask(tr_idx.astype(str), y[tr_idx], fraction=0.2, seed=seed)
    tr, va = tr_idx[~val], tr_idx[val]
    if trace is not None and getattr(method, "use_imp_forward", False):
        inner = method.on_epoch_end

        def traced(ctx):
            out = inner(ctx)
            was = method.training
            nm = imputation_nmse(method, x, mask, views, tr, te_idx)
            trace.append({m: {k: v for k, v in r.items() if k != "_pieces"} for m, r in nm.items()})
            method.train(was)
            return out
        method.on_epoch_end = traced
    part = lambda idx: ({v: x[v][idx] for v in views}, mask[idx], y[idx])  # noqa: E731
    res = loop.fit(method, part(tr), part(va), "binary", epochs=args.epochs, batch_size=64, lr=args.lr,
                   p_drop=args.p_drop, patience=args.patience, seed=seed)
    xt, mt, yt = part(te_idx)
    auroc = compute_metrics("binary", yt, loop.make_predict_fn(method, "binary")(xt, mt)["probabilities"])["auroc"]
    return method, res, float(auroc), tr


@torch.no_grad()
def slot_views(method, x: dict[str, np.ndarray], mask: np.ndarray):
    """(v, v', reference h) as numpy: v the encoded slots the model sees (absent = the fill), v' after
    the forward cascade, h the encoders on the true input (eval mode)."""
    method.eval()
    xt = {m: torch.as_tensor(a, dtype=torch.float32) for m, a in x.items()}
    mk = torch.as_tensor(mask)
    v = torch.cat(method.encode(xt, mk), 1)
    v_imp, _ = method.impute(v)
    ref = torch.cat(method.encode(xt, torch.ones_like(mk)), 1)
    return v.numpy(), v_imp.numpy(), ref.numpy()


@torch.no_grad()
def imputation_nmse(method, x, mask, views, tr_idx, te_idx) -> dict[str, dict]:
    """Per modality m: hide m in every test sample that has it and something else, and compare the
    forward cascade's slot (v'_m), the untouched fill (v_m) and a ridge regression from the other slots
    of v (fitted on the training samples that have m) with the encoders' embedding of the true input,
    as normalised MSE (1.0 = the training mean of h_m). Also returns the pieces diagnose() reuses."""
    from sklearn.linear_model import RidgeCV

    d = method.hidden_dim
    sl = lambda i: slice(i * d, (i + 1) * d)  # noqa: E731
    sub = lambda idx: {v: x[v][idx] for v in views}  # noqa: E731
    v_tr, _, ref_tr = slot_views(method, sub(tr_idx), mask[tr_idx])
    out: dict[str, dict] = {}
    for i, m in enumerate(views):
        has = mask[te_idx, i] & (mask[te_idx].sum(1) >= 2)  # observed, and something else to impute from
        if has.sum() < 10:
            continue
        idx = te_idx[has]
        hidden = mask[idx].copy()
        hidden[:, i] = False
        v, v_imp, ref = slot_views(method, sub(idx), hidden)
        target = ref[:, sl(i)]
        train_rows = mask[tr_idx, i]
        mu = ref_tr[train_rows][:, sl(i)].mean(0)
        scale = float(((target - mu) ** 2).sum(1).mean()) or 1.0
        nmse = lambda pred: float(((pred - target) ** 2).sum(1).mean() / scale)  # noqa: E731
        others = [j for j in range(len(views)) if j != i]
        cols = np.concatenate([np.arange(j * d, (j + 1) * d) for j in others])
        ridge = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(v_tr[train_rows][:, cols], ref_tr[train_rows][:, sl(i)])
        out[m] = {"n": int(has.sum()), "nmse_cascade": nmse(v_imp[:, sl(i)]),
                  "nmse_ridge": nmse(ridge.predict(v[:, cols])), "nmse_fill": nmse(v[:, sl(i)]),
                  "nmse_train_mean": nmse(np.broadcast_to(mu, target.shape)),
                  "_pieces": (idx, hidden, v_imp, mu, scale)}
    return out


@torch.no_grad()
def diagnose(method, x, y, mask, views, tr_idx, te_idx) -> dict:
    """Imputation error (cascade vs ridge vs no imputation), heads on imputed slices, DWFuse trust."""
    from sklearn.metrics import roc_auc_score

    d = method.hidden_dim
    sl = lambda i: slice(i * d, (i + 1) * d)  # noqa: E731
    sub = lambda idx: {v: x[v][idx] for v in views}  # noqa: E731
    out: dict[str, dict] = {}
    for m, rec in imputation_nmse(method, x, mask, views, tr_idx, te_idx).items():
        i = views.index(m)
        others = [j for j in range(len(views)) if j != i]
        idx, hidden, v_imp, _, _ = rec.pop("_pieces")
        _, v_imp_obs, ref_obs = slot_views(method, sub(idx), mask[idx])
        # heads: g_m on the imputed slice vs the observed slice; DWFuse trust
        yt = y[idx]
        head = method.unimodal_heads[m]
        imp_slice = torch.as_tensor(v_imp[:, sl(i)])
        obs_slice = torch.as_tensor(v_imp_obs[:, sl(i)])
        p_imp = head(imp_slice).softmax(-1)[:, 1].numpy()
        p_obs = head(obs_slice).softmax(-1)[:, 1].numpy()
        two = len(set(yt)) == 2
        rec["head_auroc_imputed"] = float(roc_auc_score(yt, p_imp)) if two else float("nan")
        rec["head_auroc_observed"] = float(roc_auc_score(yt, p_obs)) if two else float("nan")
        rec["norm_ratio_imputed_vs_observed"] = float(np.linalg.norm(v_imp[:, sl(i)], axis=1).mean()
                                                      / max(np.linalg.norm(ref_obs[:, sl(i)], axis=1).mean(), 1e-9))
        t_hid = method.predict_with_trace({k: torch.as_tensor(a) for k, a in sub(idx).items()}, torch.as_tensor(hidden))
        t_obs = method.predict_with_trace({k: torch.as_tensor(a) for k, a in sub(idx).items()},
                                          torch.as_tensor(mask[idx]))
        # the running NMSE that imputed_trust=reliability gates imputed slots by (1 - it, floored at 0)
        rec["running_nmse"] = float(method.imp_nmse[i]) if hasattr(method, "imp_nmse") else float("nan")
        rec["weight_imputed"] = float(t_hid[f"weight_{m}"].mean())
        rec["weight_observed"] = float(t_obs[f"weight_{m}"].mean())
        oth_hid = [float(t_hid[f"weight_{views[j]}"][torch.as_tensor(hidden[:, j])].mean())
                   for j in others if hidden[:, j].any()]
        oth_obs = [float(t_obs[f"weight_{views[j]}"][torch.as_tensor(mask[idx][:, j])].mean())
                   for j in others if mask[idx][:, j].any()]
        rec["others_weight_when_imputed"] = float(np.mean(oth_hid)) if oth_hid else float("nan")
        rec["others_weight_when_observed"] = float(np.mean(oth_obs)) if oth_obs else float("nan")
        out[m] = rec
    return out


def isolated_cascade(method, x, mask, views, tr_idx, te_idx, args, seed) -> list[tuple[int, dict]]:
    """The fitted model's encoders frozen (eval mode), a fresh forward cascade of the same shape and
    options trained *alone* on the model's forward-imputation loss (same simulation, batch 64, AdamW at
    --lr, gradient clip 5) for --isolated epochs. Returns [(epoch, {m: NMSE of the cascade})] at epochs
    1, 5, 10, 20, 40, ...: how fast the cascade learns the redundancy when its targets stand still."""
    from raypipe.fusion.omnifuse import CascadeResidualAutoencoder
    from raypipe.train.data import simulate_missing

    method.eval()
    d, n_mod = method.hidden_dim, len(views)
    torch.manual_seed(seed)
    casc = CascadeResidualAutoencoder(n_mod * d, len(method.cra_forward.blocks),
                                      zero_init=getattr(method, "cascade_init", "default") == "zero")
    opt = torch.optim.AdamW(casc.parameters(), lr=args.lr, weight_decay=1e-4)
    xt = {m: torch.as_tensor(x[m][tr_idx], dtype=torch.float32) for m in views}
    full = torch.as_tensor(mask[tr_idx])
    with torch.no_grad():
        target = torch.cat(method.encode(xt, full), 1)
    rng = np.random.default_rng(seed)
    report_at = {1, 5, 10} | set(range(20, args.isolated + 1, 20)) | {args.isolated}
    out = []
    for epoch in range(1, args.isolated + 1):
        casc.train()
        for b in np.array_split(rng.permutation(len(tr_idx)), max(1, len(tr_idx) // 64)):
            seen = simulate_missing(full[b], args.p_drop, rng)
            with torch.no_grad():
                v = torch.cat(method.encode({m: t[b] for m, t in xt.items()}, seen), 1)
            counted = full[b] if method.imp_forward_on == "known" else full[b] & ~seen
            diff = casc(v)[0] - target[b]
            loss = method._squared_error(diff, method._position_mask(counted), len(b))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(casc.parameters(), 5.0)
            opt.step()
        if epoch in report_at:
            casc.eval()
            original, method.cra_forward = method.cra_forward, casc  # measured exactly like the fitted cascade
            try:
                nm = imputation_nmse(method, x, mask, views, tr_idx, te_idx)
            finally:
                method.cra_forward = original
            out.append((epoch, {m: r["nmse_cascade"] for m, r in nm.items()}))
    return out


def loss_terms(method, history: list[dict], best_epoch: int) -> dict:
    weights = {"imp_forward": 1.0, "imp_backward": method.lambda1, "dwfuse": method.lambda2, "tla": method.lambda3}
    out = {}
    for label, h in (("first", history[0]), ("best", history[max(best_epoch, 1) - 1])):
        out[label] = {k: (float(h[f"train_loss_{k}"]), float(h[f"train_loss_{k}"]) * w)
                      for k, w in weights.items() if f"train_loss_{k}" in h}
    return out


# ----------------------------------------------------------------------------- profile
def profile_epochs(ds: str, args) -> dict:
    """CPU seconds (this thread) of each phase of a training epoch, concat vs row b vs row e.

    The epoch is :func:`raypipe.train.loop.train_epoch` unrolled so that each phase is timed on its own:
    simulation + forward (of which TLA's lazy-view pass), backward, gradient clipping, the AdamW step
    (foreach, as the loop builds it, and fused, the single-kernel CPU implementation), TLA mining
    (``on_epoch_end``) and the validation pass. Fold 0 of 5, natural availability, batch 64; the
    first epoch is discarded (warm-up, no lazy subset yet)."""
    from raypipe.train.data import simulate_missing, tensor_batches

    x, natural, y, views = load_dataset(ds, args.n, args.seed)
    folds = kfold_assignments(np.arange(len(y)).astype(str), y, k=5, seed=args.seed)
    tr, va = np.flatnonzero(folds != 0), np.flatnonzero(folds == 0)
    part = lambda idx: ({v: x[v][idx] for v in views}, natural[idx], y[idx])  # noqa: E731
    specs = [ModalitySpec(v, (x[v].shape[1],)) for v in views]
    clock = time.thread_time
    out = {}
    for row in args.rows.split(","):
        name, switches = ROWS[row]
        for opt_kind in (("foreach", "fused") if name == "omnifuse" and row == "e" else ("foreach",)):
            torch.manual_seed(args.seed)
            cfg = train_config(args, switches, name)
            method = build_method(name, specs, "binary", 2, cfg)
            opt = torch.optim.AdamW(method.parameters(), lr=args.lr, weight_decay=1e-4,
                                    **({"fused": True} if opt_kind == "fused" else {"foreach": True}))
            xtr, mtr, ytr = part(tr)
            ctx = loop.HookContext(p_drop=args.p_drop, seed=args.seed,
                                   train_batches=lambda: tensor_batches(xtr, mtr, ytr, "binary", 512))
            lazy_t = [0.0]
            if hasattr(method, "joint_logits"):
                inner = method.joint_logits

                def timed(*a, **k):
                    t = clock()
                    try:
                        return inner(*a, **k)
                    finally:
                        lazy_t[0] += clock() - t
                method.joint_logits = timed
            phases: dict[str, list[float]] = {}
            for epoch in range(args.profile_epochs + 1):
                t = dict.fromkeys(("forward", "of which TLA lazy view", "backward", "clip", "optimizer", "TLA mining",
                                   "validation"), 0.0)
                lazy_t[0] = 0.0
                ctx.epoch = epoch
                method.train()
                rng = np.random.default_rng([args.seed, epoch, 0])
                for batch in tensor_batches(xtr, mtr, ytr, "binary", 64, shuffle=True, seed=epoch):
                    c0 = clock()
                    seen = simulate_missing(batch["mask"], args.p_drop, rng)
                    res = method({"x": batch["x"], "mask": seen, "y": batch["y"]}, full_mask=batch["mask"])
                    c1 = clock()
                    opt.zero_grad(set_to_none=True)
                    res["loss"].backward()
                    c2 = clock()
                    torch.nn.utils.clip_grad_norm_(method.parameters(), 5.0, foreach=True)
                    c3 = clock()
                    opt.step()
                    c4 = clock()
                    t["forward"] += c1 - c0
                    t["backward"] += c2 - c1
                    t["clip"] += c3 - c2
                    t["optimizer"] += c4 - c3
                t["of which TLA lazy view"] = lazy_t[0]
                c0 = clock()
                method.on_epoch_end(ctx)
                t["TLA mining"] = clock() - c0
                c0 = clock()
                loop.evaluate(method, tensor_batches(*part(va), "binary", 512), "binary")
                t["validation"] = clock() - c0
                if epoch:  # epoch 0: warm-up
                    for k, v in t.items():
                        phases.setdefault(k, []).append(v)
            mean = {k: float(np.mean(v)) for k, v in phases.items()}
            mean["total"] = sum(v for k, v in mean.items() if not k.startswith("of which"))
            label = row if name != "omnifuse" or row != "e" else f"e ({opt_kind} AdamW)"
            out[label] = {"cpu_s": mean, "parameters": int(sum(p.numel() for p in method.parameters())),
                          "n_train": int(len(tr))}
    base = out.get("concat", {}).get("cpu_s", {}).get("total")
    print(f"\n## CPU seconds per epoch, {ds}, n_train {len(tr)}, width {args.hidden}, R = {args.depth}, batch 64, "
          f"overrides {args.omni or 'none'}; mean of epochs 2..{args.profile_epochs + 1}; 1-min load "
          f"{os.getloadavg()[0]:.1f}\n")
    keys = list(next(iter(out.values()))["cpu_s"])
    print("| row | params | " + " | ".join(keys) + " | x concat |")
    print("|---|---|" + "---|" * (len(keys) + 1))
    for label, rec in out.items():
        c = rec["cpu_s"]
        ratio = f"{c['total'] / base:.1f}" if base else "-"
        print(f"| {label} | {rec['parameters']:,} | " + " | ".join(f"{c[k]:.3f}" for k in keys) + f" | {ratio} |")
    sys.stdout.flush()
    return out


# ----------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="breast_cancer,synth", help="comma list: synth (generator v1), synth2 (v2), breast_cancer")
    p.add_argument("--rates", default="0,0.5,0.9", help="random view-dropout rates of the condition masks")
    p.add_argument("--rows", default="concat,b,c,d,e", help="concat and OmniFuse ablation rows b,c,d,e")
    p.add_argument("--n", type=int, default=600, help="synthetic cohort size")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=8)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--depth", type=int, default=5, help="R, residual autoencoders per cascade (paper: 5)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--p-drop", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an OmniFuseConfig override for every OmniFuse row (repeatable)")
    p.add_argument("--no-diagnose", action="store_true", help="AUROC table and times only")
    p.add_argument("--trace", action="store_true",
                   help="rows d/e: the test-fold imputation NMSE (cascade vs ridge) after every epoch")
    p.add_argument("--isolated", type=int, default=0, metavar="EPOCHS",
                   help="rows d/e: also train a fresh forward cascade alone on the fitted, frozen encoders")
    p.add_argument("--json", help="write everything measured here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true",
                   help="instead of the diagnosis: CPU seconds per phase of an epoch (--rows, default concat,b,e)")
    p.add_argument("--profile-epochs", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    args.omni = {}
    for kv in args.set:
        k, _, val = kv.partition("=")
        try:
            args.omni[k] = json.loads(val)  # numbers, true/false, lists
        except json.JSONDecodeError:
            args.omni[k] = val  # a plain string (e.g. loss_scale=mean)
    if args.profile:
        if args.rows == p.get_default("rows"):
            args.rows = "concat,b,e"
        report = {"args": vars(args), "profile": {ds: profile_epochs(ds, args) for ds in args.dataset.split(",")}}
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=1, default=float)
        return
    rows = [r for r in args.rows.split(",") if r]
    rates = [float(r) for r in args.rates.split(",")]
    report: dict = {"args": {k: v for k, v in vars(args).items()}, "results": {}}
    t_start = time.perf_counter()
    print(f"# OmniFuse diagnosis: width {args.hidden}, R = {args.depth}, {args.folds} folds, <= {args.epochs} epochs "
          f"(patience {args.patience}), p_drop {args.p_drop}, overrides {args.omni or 'none'}; "
          f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)")
    for ds in args.dataset.split(","):
        x, natural, y, views = load_dataset(ds, args.n, args.seed)
        folds = kfold_assignments(np.arange(len(y)).astype(str), y, k=args.folds, seed=args.seed)
        for rate in rates:
            mask = drop_at_random(natural, rate, args.seed + 99) if rate > 0 else natural
            key = f"{ds}@{rate:.0%}"
            res = report["results"][key] = {"auroc": {}, "sec_per_epoch": {}, "diag": {}, "loss_terms": {}}
            for row in rows:
                for f in range(args.folds):
                    tr, te = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
                    trace = [] if args.trace and row in ("d", "e") else None
                    method, fitres, auroc, fit_idx = fit_one(row, x, y, mask, views, tr, te, args, args.seed + f,
                                                             trace=trace)
                    if trace is not None:
                        res.setdefault("trace", {}).setdefault(row, []).append(
                            {"best_epoch": fitres["best_epoch"], "epochs": trace})
                    if args.isolated and row in ("d", "e"):
                        res.setdefault("isolated", {}).setdefault(row, []).append(
                            isolated_cascade(method, x, mask, views, fit_idx, te, args, args.seed + f))
                    res["auroc"].setdefault(row, []).append(auroc)
                    res["sec_per_epoch"].setdefault(row, []).append(
                        float(np.mean([h["seconds"] for h in fitres["history"]])))
                    if row in ("d", "e") and not args.no_diagnose:
                        res["diag"].setdefault(row, []).append(diagnose(method, x, y, mask, views, fit_idx, te))
                    if ROWS[row][0] == "omnifuse":
                        res["loss_terms"].setdefault(row, []).append(
                            loss_terms(method, fitres["history"], fitres["best_epoch"]))
                a = res["auroc"][row]
                print(f"[{time.perf_counter() - t_start:6.0f}s] {key:20s} row {row:6s} AUROC {np.mean(a):.3f} ± "
                      f"{np.std(a, ddof=1) if len(a) > 1 else 0:.3f}  {np.mean(res['sec_per_epoch'][row]):.3f} s/epoch",
                      file=sys.stderr, flush=True)
            print_condition(key, res, rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1, default=float)


def print_condition(key: str, res: dict, rows: list[str]) -> None:
    from scipy.stats import ttest_rel

    print(f"\n## {key}")
    a = res["auroc"]
    cells = []
    for r in rows:
        s = f"{r}: {np.mean(a[r]):.3f} ± {np.std(a[r], ddof=1) if len(a[r]) > 1 else 0:.3f}"
        if r != "e" and "e" in a and len(a[r]) > 1 and len(a[r]) == len(a["e"]):
            s += f" (p vs e {ttest_rel(a['e'], a[r]).pvalue:.2g})"
        cells.append(s)
    print("AUROC  " + " | ".join(cells))
    t = {r: np.mean(v) for r, v in res["sec_per_epoch"].items()}
    if "concat" in t:
        print("s/epoch " + " | ".join(f"{r}: {t[r]:.3f} ({t[r] / t['concat']:.1f}x concat)" for r in t))
    for row, diags in res["diag"].items():
        views = sorted({m for dg in diags for m in dg}, key=lambda m: list(diags[0]).index(m) if m in diags[0] else 99)
        for m in views:
            recs = [dg[m] for dg in diags if m in dg]
            mean = lambda k: np.nanmean([r[k] for r in recs])  # noqa: E731
            print(f"row {row} {m:8s} NMSE cascade {mean('nmse_cascade'):.3f} ridge {mean('nmse_ridge'):.3f} "
                  f"fill {mean('nmse_fill'):.3f} (running NMSE {mean('running_nmse'):.2f}) | head AUROC imputed {mean('head_auroc_imputed'):.3f} observed "
                  f"{mean('head_auroc_observed'):.3f} norm x{mean('norm_ratio_imputed_vs_observed'):.2f} | "
                  f"w imputed {mean('weight_imputed'):.3f} observed {mean('weight_observed'):.3f}; others' w when "
                  f"imputed {mean('others_weight_when_imputed'):.3f} vs observed {mean('others_weight_when_observed'):.3f}")
    for row, folds in res.get("trace", {}).items():
        views = list(folds[0]["epochs"][0]) if folds[0]["epochs"] else []
        best = [fd["best_epoch"] for fd in folds]
        print(f"row {row} per-epoch test NMSE, cascade / ridge (mean over the folds that ran the epoch; "
              f"best epochs {best}):")
        for e in range(max(len(fd["epochs"]) for fd in folds)):
            recs = [fd["epochs"][e] for fd in folds if e < len(fd["epochs"])]
            cells = [f"{m} {np.mean([r[m]['nmse_cascade'] for r in recs if m in r]):.2f} / "
                     f"{np.mean([r[m]['nmse_ridge'] for r in recs if m in r]):.2f}" for m in views]
            mark = " <- a best epoch" if (e + 1) in best else ""
            print(f"  epoch {e + 1:2d}: " + " | ".join(cells) + mark)
    for row, runs in res.get("isolated", {}).items():
        print(f"row {row} cascade trained alone on the frozen encoders, test NMSE (mean over folds):")
        for k, (epoch, _) in enumerate(runs[0]):
            per = [r[k][1] for r in runs if k < len(r)]
            print(f"  epoch {epoch:3d}: " + " | ".join(f"{m} {np.mean([p[m] for p in per if m in p]):.2f}"
                                                    for m in per[0]))
    for row, lts in res["loss_terms"].items():
        for label in ("first", "best"):
            keys = [k for k in ("imp_forward", "imp_backward", "dwfuse", "tla") if any(k in lt[label] for lt in lts)]
            # a term absent in an epoch (TLA before the first mining) counts as 0 there
            terms = {k: np.mean([lt[label].get(k, (0.0, 0.0))[0] for lt in lts]) for k in keys}
            weighted = {k: np.mean([lt[label].get(k, (0.0, 0.0))[1] for lt in lts]) for k in keys}
            print(f"row {row} loss terms ({label} epoch) raw " + " ".join(f"{k} {v:.3g}" for k, v in terms.items())
                  + " | weighted " + " ".join(f"{k} {v:.3g}" for k, v in weighted.items()))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
