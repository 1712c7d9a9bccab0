"""OmniFuse (METHOD.md section 1): cascade residual-autoencoder imputation (IMP), Dynamic
Weighted Fuse (DWFuse) and Traceable Laziness Activation (TLA).

Every component has a switch (``OmniFuseConfig``) so the ablation rows of the
paper's Table 4 are configs (docs/fusion.md):

====  =========================================  ==========================================
row   components                                 config
====  =========================================  ==========================================
a     concat baseline                            ``train.method=concat``
b     DWFuse                                     imp_forward/imp_backward/tla off
c     DWFuse + TLA                               imp_forward/imp_backward off
d     DWFuse + TLA + IMP forward                 imp_backward off
e     DWFuse + TLA + IMP forward + backward      all on (default)
f     IMP + TLA without DWFuse (joint head only) use_dwfuse off
====  =========================================  ==========================================

Loss scaling (``loss_scale``): ``sum`` (default) follows the paper's Eq. 7, 8 and 12 (squared
norms over the counted slots, unimodal CE summed over modalities) so that lambda = (1, 10, 0.5)
weigh terms of the paper's size; ``mean`` is the per-position / per-modality normalised variant.
``imp_forward_on`` picks the slots of the forward loss (``known``: every slot with a known truth,
Eq. 7; ``dropped``: only the simulated-missing ones); ``absent_fill`` is documented on
``FusionMethod``; ``mine_every`` mines TLA's lazy subset every k epochs (default 1, the paper's).
``cascade_init``, ``imp_warmup``, ``imp_hide_one`` and ``cascade_passes`` (constructor options, paper
behaviour by default) were the root-cause trials of issue 14: the cascade is starved of optimisation
steps before early stopping; none improved AUROC (docs/fusion.md, "Why the cascade does not learn
what a ridge finds"). ``imp_patience`` (off by default) holds the loop's early stopping while the cascade's
validation NMSE improves; measured, it returns the same weights (docs/fusion.md). Speed: TLA mining runs under
inference mode in chunks of ``mining_chunk`` rows; ``subset_losses_reference`` is its straightforward check.
Measurements behind the defaults: docs/fusion.md and ``benchmarks/omnifuse_diagnose.py``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from raypipe.fusion.base import (FusionMethod, MethodInfo, ModalitySpec, down_weighting, mlp, nonempty_subsets,
                                 per_sample_loss, predicted_target, probabilities, true_value_probability)

LATENT_DIM = 64


class ResidualAutoencoder(nn.Module):
    """RA_k: MD -> 256 -> 128 -> 64 (latent c_k) -> 128 -> 256 -> MD (delta_k)."""

    def __init__(self, width: int):
        super().__init__()
        # in-place activations: each acts on a Linear's fresh output, which no backward needs (a Linear's
        # gradient uses its input), so this is the same computation without one tensor per activation
        self.encoder = nn.Sequential(nn.Linear(width, 256), nn.LeakyReLU(inplace=True), nn.Linear(256, 128),
                                     nn.LeakyReLU(inplace=True), nn.Linear(128, LATENT_DIM))
        self.decoder = nn.Sequential(nn.Linear(LATENT_DIM, 128), nn.ReLU(inplace=True), nn.Linear(128, 256),
                                     nn.ReLU(inplace=True), nn.Linear(256, width))

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.encoder(v)
        return self.decoder(c), c


class CascadeResidualAutoencoder(nn.Module):
    """R residual autoencoders in cascade (paper Eq. 4-5).

    delta_1 = RA_1(v); delta_k = RA_k(v + delta_1 + ... + delta_{k-1}); output v + sum_k delta_k.
    """

    def __init__(self, width: int, depth: int, zero_init: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(ResidualAutoencoder(width) for _ in range(depth))
        if zero_init:  # every delta_k = 0 at the start: the untrained cascade is the identity
            for block in self.blocks:
                nn.init.zeros_(block.decoder[-1].weight)
                nn.init.zeros_(block.decoder[-1].bias)

    def forward(self, v: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        total = torch.zeros_like(v)
        latents = []
        for block in self.blocks:
            delta, c = block(v + total)
            total = total + delta
            latents.append(c)
        return v + total, latents

    def latents(self, v: torch.Tensor) -> list[torch.Tensor]:
        """c_1..c_R only: the same computation without the last decoder (its delta_R feeds nothing)."""
        total, latents = None, []
        for k, block in enumerate(self.blocks):
            c = block.encoder(v if total is None else v + total)
            latents.append(c)
            if k + 1 < len(self.blocks):
                delta = block.decoder(c)
                total = delta if total is None else total + delta
        return latents


class OmniFuse(FusionMethod):
    info = MethodInfo("omnifuse", "imputation", hooks=("on_epoch_start", "on_epoch_end"),
                      description="CRA imputation + DWFuse + TLA (Wu et al. 2025)")

    def __init__(self, specs: Sequence[ModalitySpec], task: str, n_outputs: int, hidden_dim: int = 128,
                 depth: int = 5, alpha: float = 0.1, beta: float = 0.5, lambda1: float = 1.0, lambda2: float = 10.0,
                 lambda3: float = 0.5, use_imp_forward: bool = True, use_imp_backward: bool = True,
                 use_dwfuse: bool = True, use_tla: bool = True, loss_scale: str = "sum",
                 absent_fill: str = "mean", imp_forward_on: str = "known", mine_every: int = 1,
                 joint_skip: bool = False, imputed_trust: str = "same", cascade_grad: str = "all",
                 cascade_init: str = "default", imp_warmup: int = 0, imp_hide_one: bool = False,
                 cascade_passes: int = 0, imp_patience: int = 0):
        super().__init__(specs, task, n_outputs, hidden_dim)
        if cascade_init not in ("default", "zero"):
            raise ValueError(f"cascade_init must be 'default' (paper) or 'zero', got {cascade_init!r}")
        if imp_warmup < 0:
            raise ValueError(f"imp_warmup must be >= 0, got {imp_warmup}")
        # imp_warmup epochs count towards the loop's early-stopping patience (keep it <= patience - 2);
        # it and cascade_passes act on the forward cascade only, so they do nothing with use_imp_forward off
        self.cascade_init, self.imp_warmup, self.imp_hide_one = cascade_init, int(imp_warmup), bool(imp_hide_one)
        self.warming_up = False  # set per epoch by on_epoch_start (imp_warmup)
        if cascade_passes < 0:
            raise ValueError(f"cascade_passes must be >= 0, got {cascade_passes}")
        self.cascade_passes = int(cascade_passes)
        if imp_patience < 0:
            raise ValueError(f"imp_patience must be >= 0, got {imp_patience}")
        # imp_patience: the loop may not stop early while the cascade's validation NMSE improved within
        # the last imp_patience epochs (0: off, the paper's single early stopping on the classifier)
        self.imp_patience = int(imp_patience)
        self._imp_best, self._imp_since = float("inf"), 0
        self._cascade_opt: torch.optim.Optimizer | None = None  # cascade_passes' own AdamW (lr 1e-3)
        if imputed_trust not in ("same", "reliability"):
            raise ValueError(f"imputed_trust must be 'same' (paper) or 'reliability', got {imputed_trust!r}")
        if cascade_grad not in ("all", "imputation", "separate"):
            raise ValueError(f"cascade_grad must be 'all' (paper), 'imputation' or 'separate', got {cascade_grad!r}")
        if loss_scale not in ("sum", "mean"):
            raise ValueError(f"loss_scale must be 'sum' (paper) or 'mean', got {loss_scale!r}")
        if absent_fill not in ("mean", "zero_input"):
            raise ValueError(f"absent_fill must be 'mean' or 'zero_input', got {absent_fill!r}")
        if imp_forward_on not in ("known", "dropped"):
            raise ValueError(f"imp_forward_on must be 'known' (paper) or 'dropped', got {imp_forward_on!r}")
        if mine_every < 1:
            raise ValueError(f"mine_every must be >= 1, got {mine_every}")
        self.loss_scale, self.absent_fill, self.imp_forward_on = loss_scale, absent_fill, imp_forward_on
        self.mine_every = int(mine_every)
        self.joint_skip, self.imputed_trust, self.cascade_grad = bool(joint_skip), imputed_trust, cascade_grad
        m, d = len(self.modalities), hidden_dim
        self.alpha, self.beta = alpha, beta
        self.lambda1, self.lambda2, self.lambda3 = lambda1, lambda2, lambda3
        self.use_imp_forward = use_imp_forward
        self.use_imp_backward = use_imp_backward and use_imp_forward  # backward refines the forward output
        self.use_dwfuse, self.use_tla = use_dwfuse, use_tla
        zero = cascade_init == "zero"
        if self.use_imp_forward:
            self.cra_forward = CascadeResidualAutoencoder(m * d, depth, zero_init=zero)
        if self.use_imp_backward:
            self.cra_backward = CascadeResidualAutoencoder(m * d, depth, zero_init=zero)
        self.unimodal_heads = nn.ModuleDict({name: mlp(d, d, n_outputs) for name in self.modalities})
        joint_in = (depth * LATENT_DIM + (m * d if self.joint_skip else 0)) if self.use_imp_forward else m * d
        self.joint_head = mlp(joint_in, max(64, d), n_outputs)
        # running normalised MSE of the forward imputation per modality (imputed_trust: reliability);
        # starts at 1 (= no better than the mean: imputed slots untrusted until the cascade earns it)
        self.register_buffer("imp_nmse", torch.ones(m))
        self.lazy_subset: tuple[int, ...] | None = None  # chosen by TLA after each epoch
        self.last_trace: dict[str, Any] | None = None

    # ------------------------------------------------------------------ core
    def impute(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v', joint-head input): forward CRA if on, else identity and concat(h).

        The joint-head input is concat(c_1..c_R) (paper), with ``joint_skip`` also v itself (the
        observed / filled slots), so that the cascade can only add to what row b's head sees."""
        if not self.use_imp_forward:
            return v, v
        # separate: the cascade reads v through a stop-gradient, so the imputation losses train the
        # cascades only and never pull the encoders' embeddings (e.g. towards small norms)
        v_imp, latents = self.cra_forward(v.detach() if self.cascade_grad == "separate" else v)
        return v_imp, self._joint_input(v, latents)

    def _joint_input(self, v: torch.Tensor, latents: list[torch.Tensor]) -> torch.Tensor:
        lat = torch.cat(latents, dim=1)
        if self.cascade_grad != "all":
            lat = lat.detach()  # the classification losses do not reach the cascade
        return torch.cat([lat, v], dim=1) if self.joint_skip else lat

    def trust(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, M) factor on DWFuse's weight: 1 for observed slots; for imputed ones 1 (``same``, the
        paper) or the cascade's running reliability max(0, 1 - NMSE_m) (``reliability``)."""
        if self.imputed_trust == "same" or not self.use_imp_forward:
            return torch.ones(mask.shape, dtype=torch.float32, device=mask.device)
        rel = (1.0 - self.imp_nmse).clamp(0.0, 1.0).to(mask.device)
        return torch.where(mask, torch.ones_like(rel).expand(mask.shape), rel.unsqueeze(0).expand(mask.shape))

    @torch.no_grad()
    def _track_reliability(self, v_imp: torch.Tensor, v_full: torch.Tensor, dropped: torch.Tensor,
                           full_mask: torch.Tensor, momentum: float = 0.1) -> None:
        """Running NMSE_m = E||v'_m - h_m||^2 / E||h_m - mean h_m||^2 over the slots hidden by the
        simulation (the denominator over every row where m is known: 1.0 = predicting the mean)."""
        # all modalities at once, as (B, M, d) with the masks as weights: no per-modality branch, so no
        # host-device sync per step on a GPU; a modality with no hidden slot or < 2 known rows keeps its value
        b, m = dropped.shape
        imp, ref = v_imp.detach().reshape(b, m, -1), v_full.reshape(b, m, -1)
        hid, known = dropped.to(ref.dtype), full_mask.to(ref.dtype)
        n_hid, n_known = hid.sum(0), known.sum(0)
        mean = (ref * known.unsqueeze(2)).sum(0) / n_known.clamp_min(1).unsqueeze(1)
        var = (((ref - mean) ** 2).sum(2) * known).sum(0) / n_known.clamp_min(1)
        err = (((imp - ref) ** 2).sum(2) * hid).sum(0) / n_hid.clamp_min(1)
        nmse = (err / var.clamp_min(1e-8)).clamp(max=10.0).to(self.imp_nmse.dtype)
        update = (n_hid >= 1) & (n_known >= 2)
        self.imp_nmse.copy_(torch.where(update, (1 - momentum) * self.imp_nmse + momentum * nmse, self.imp_nmse))

    @staticmethod
    def _hide_one(mask: torch.Tensor) -> torch.Tensor:
        """``mask`` with one seen modality hidden, uniformly at random, in every row that has >= 2."""
        score = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, -1.0)
        pick = torch.zeros_like(mask).scatter_(1, score.argmax(dim=1, keepdim=True), True)
        return mask & ~(pick & (mask.sum(dim=1, keepdim=True) >= 2))

    def _slices(self, v: torch.Tensor) -> list[torch.Tensor]:
        d = self.hidden_dim
        return [v[:, i * d:(i + 1) * d] for i in range(len(self.modalities))]

    def _position_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, M) modality mask -> (B, M*D) position mask."""
        # expand + reshape: the same values as mask.repeat_interleave(D, dim=1), which costs ~1 ms on CPU
        b, m = mask.shape
        return mask.to(torch.float32).unsqueeze(2).expand(b, m, self.hidden_dim).reshape(b, m * self.hidden_dim)

    def joint_logits(self, x: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        v = torch.cat(self.encode(x, mask), dim=1)
        return self.joint_from_v(v)

    def joint_from_v(self, v: torch.Tensor) -> torch.Tensor:
        """The joint head's logits for triplets v (only the cascade latents are computed)."""
        joint_in = self._joint_input(v, self.cra_forward.latents(v)) if self.use_imp_forward else v
        return self.joint_head(joint_in)

    def _squared_error(self, diff: torch.Tensor, pm: torch.Tensor, batch: int) -> torch.Tensor:
        """sum: the paper's per-sample squared norm over the counted positions, averaged over the batch
        (Eq. 7-8); mean: the mean over the counted positions (the normalised variant)."""
        se = ((diff ** 2) * pm).sum()
        if self.loss_scale == "sum":
            return se / max(batch, 1)
        return se / pm.sum().clamp_min(1.0)

    def forward(self, batch: dict, full_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x, mask, y = batch["x"], batch["mask"], batch.get("y")
        warm = self.warming_up and self.training and y is not None and self.use_imp_forward
        hs = self.encode(x, mask)
        v = torch.cat(hs, dim=1)
        if warm:  # imp_warmup: the encoders stay as they are, only the cascades learn
            v = v.detach()
        v_imp, joint_in = self.impute(v)
        logits = self.joint_head(joint_in)
        out: dict[str, torch.Tensor] = {"logits": logits}
        if y is None:
            return out
        losses: dict[str, torch.Tensor] = {}
        zero = logits.new_zeros(())
        # IMP forward: reconstruct the truly-available-but-dropped positions from encoders on the true input
        batch_n = int(mask.shape[0])
        if self.use_imp_forward and full_mask is not None:
            dropped = full_mask & ~mask
            # Eq. 7 compares v' with the true triplet wherever it is known (the cascade must also leave
            # observed slots as they are); "dropped" counts only the slots hidden by the simulation
            counted = full_mask if self.imp_forward_on == "known" else dropped
            # imp_hide_one: a second forward pass in which every sample that saw >= 2 modalities also
            # hides one of them at random, so the cascade gets ~1 imputation example per sample per step
            # instead of the simulation's ~0.3; L_fwd is then the mean of the two passes' losses
            seen2 = self._hide_one(mask) if self.imp_hide_one and self.training else None
            if dropped.any() or seen2 is not None:
                v_full = torch.cat(self.encode_reference(x, full_mask), dim=1)
                terms = []
                if dropped.any():
                    terms.append(self._squared_error(v_imp - v_full, self._position_mask(counted), batch_n))
                    if self.training and self.imputed_trust == "reliability":
                        self._track_reliability(v_imp, v_full, dropped, full_mask)
                if seen2 is not None:
                    # the encoders in eval mode for this second pass (with gradient): their running
                    # input statistics are updated once per step, from the batch's own mask, not again
                    with self.encoders_in_eval():
                        v2 = torch.cat(self.encode(x, seen2), dim=1)
                    v2_imp, _ = self.cra_forward(v2.detach() if self.cascade_grad == "separate" or warm else v2)
                    counted2 = full_mask if self.imp_forward_on == "known" else full_mask & ~seen2
                    terms.append(self._squared_error(v2_imp - v_full, self._position_mask(counted2), batch_n))
                losses["imp_forward"] = torch.stack(terms).mean() if len(terms) > 1 else terms[0]
            else:
                losses["imp_forward"] = zero
        # IMP backward: a second cascade maps v' back onto the positions the model saw
        if self.use_imp_backward:
            v_back, _ = self.cra_backward(v_imp)
            losses["imp_backward"] = self._squared_error(v_back - v.detach(), self._position_mask(mask), batch_n)
        # DWFuse: unimodal heads on the imputed slices, down-weighted by the others' confidence
        joint = per_sample_loss(logits, y, self.task).mean()
        if self.use_dwfuse:
            # cascade_grad imputation / separate: the heads see v' but their losses reach the cascade's
            # parameters not at all (only v's own path back to the encoders)
            v_heads = v + (v_imp - v).detach() if self.cascade_grad != "all" and self.use_imp_forward else v_imp
            uni_logits = [self.unimodal_heads[m](s) for m, s in zip(self.modalities, self._slices(v_heads))]
            uni_loss = torch.stack([per_sample_loss(lg, y, self.task) for lg in uni_logits], dim=1)  # (B, M)
            with torch.no_grad():
                q = torch.stack([true_value_probability(lg, y, self.task, float(self.var_y)) for lg in uni_logits], 1)
                w = down_weighting(q, self.beta) * self.trust(mask)
            # Eq. 12: summed over modalities (paper); "mean" averages them
            per_sample = (w * uni_loss).sum(dim=1) if self.loss_scale == "sum" else (w * uni_loss).mean(dim=1)
            losses["dwfuse"] = per_sample.mean() + self.alpha * joint
            out["weights"] = w
        else:
            losses["dwfuse"] = joint
        # TLA: the lazy combination seen alone, for every sample that can show it
        if self.use_tla and self.lazy_subset is not None:
            lazy = torch.zeros(len(self.modalities), dtype=torch.bool, device=mask.device)
            lazy[list(self.lazy_subset)] = True
            rows = (full_mask if full_mask is not None else mask)[:, lazy].all(dim=1)
            if rows.any():
                sub_x = {m: t[rows] for m, t in x.items()}
                sub_mask = lazy.unsqueeze(0).expand(int(rows.sum()), -1)
                lazy_logits = self.joint_logits(sub_x, sub_mask)
                losses["tla"] = per_sample_loss(lazy_logits, y[rows], self.task).mean()
            else:
                losses["tla"] = zero
        total = losses.get("imp_forward", zero) + self.lambda1 * losses.get("imp_backward", zero)
        if not warm:  # imp_warmup: the classification terms are computed (and logged) but weigh 0
            total = total + self.lambda2 * losses["dwfuse"] + self.lambda3 * losses.get("tla", zero)
        out["loss"] = total
        out.update({f"loss_{k}": v.detach() for k, v in losses.items()})
        return out

    # ------------------------------------------------------------------ TLA mining
    #: rows of (sample, subset) pairs pushed through the cascade at once when mining (TLA): large
    #: enough for efficient matrix products, small enough that the 256-wide activations stay in cache
    mining_chunk: int = 2048

    def subset_losses(self, batches, all_reduce=None) -> dict[tuple[int, ...], float]:
        """d_S for every non-empty subset S: mean CE of the joint head with modalities outside S masked,
        over the samples that have every modality of S. Sums are all-reduced across workers.

        Batched: each modality is encoded once per batch (present and absent rows), the masked
        triplets of every (sample, subset) pair are gathered from those (subset-major order) and pushed
        through the cascade and the joint head in chunks of ``mining_chunk`` rows, under
        ``torch.inference_mode``. In eval mode the encoders and the cascade are per-row functions, so
        this equals masking and encoding each subset separately (:meth:`subset_losses_reference`)."""
        subsets = nonempty_subsets(len(self.modalities))
        # created outside inference mode: the all-reduce may update them in place afterwards
        sums = torch.zeros(len(subsets), dtype=torch.float64)
        counts = torch.zeros(len(subsets), dtype=torch.float64)
        was_training = self.training
        self.eval()
        try:
            self._accumulate_subset_losses(batches, subsets, sums, counts)
        finally:
            self.train(was_training)
        if all_reduce is not None:
            stacked = all_reduce(torch.stack([sums, counts]))
            sums, counts = stacked[0], stacked[1]
        return {s: (float(sums[j] / counts[j]) if counts[j] > 0 else float("-inf")) for j, s in enumerate(subsets)}

    @torch.inference_mode()
    def _accumulate_subset_losses(self, batches, subsets, sums: torch.Tensor, counts: torch.Tensor) -> None:
        want = torch.zeros(len(subsets), len(self.modalities), dtype=torch.bool)
        for j, s in enumerate(subsets):
            want[j, list(s)] = True
        for batch in batches:
            x, mask, y = batch["x"], batch["mask"], batch["y"]
            w = want.to(mask.device)
            # (S, n): sample i has every modality of subset j
            can = (mask.unsqueeze(0) | ~w.unsqueeze(1)).all(dim=2)
            sub_idx, row_idx = can.nonzero(as_tuple=True)
            if sub_idx.numel() == 0:
                continue
            present = torch.cat(self.encode(x, mask), dim=1)
            absent = torch.cat(self.encode(x, torch.zeros_like(mask)), dim=1)
            keep = w[sub_idx]
            for start in range(0, int(sub_idx.numel()), self.mining_chunk):
                sl = slice(start, start + self.mining_chunk)
                rows = row_idx[sl]
                v = torch.where(self._position_mask(keep[sl]).bool(), present[rows], absent[rows])
                loss = per_sample_loss(self.joint_from_v(v), y[rows], self.task)
                owner = sub_idx[sl].cpu()
                sums.index_add_(0, owner, loss.double().cpu())
                counts.index_add_(0, owner, torch.ones(owner.shape, dtype=torch.float64))

    @torch.no_grad()
    def subset_losses_reference(self, batches) -> dict[tuple[int, ...], float]:
        """d_S the straightforward way (METHOD 1.4 read literally): for each subset, mask the modalities
        outside it, encode and run the joint head on the samples that have it. The check on
        :meth:`subset_losses` (same values up to float rounding); not used in training."""
        subsets = nonempty_subsets(len(self.modalities))
        sums, counts = [0.0] * len(subsets), [0] * len(subsets)
        was_training = self.training
        self.eval()
        for batch in batches:
            x, mask, y = batch["x"], batch["mask"], batch["y"]
            for j, s in enumerate(subsets):
                rows = mask[:, list(s)].all(dim=1)
                if not rows.any():
                    continue
                sub_mask = torch.zeros(int(rows.sum()), len(self.modalities), dtype=torch.bool, device=mask.device)
                sub_mask[:, list(s)] = True
                loss = per_sample_loss(self.joint_logits({m: t[rows] for m, t in x.items()}, sub_mask), y[rows],
                                       self.task)
                sums[j] += float(loss.double().sum())
                counts[j] += int(rows.sum())
        self.train(was_training)
        return {s: (sums[j] / counts[j] if counts[j] else float("-inf")) for j, s in enumerate(subsets)}

    def on_epoch_start(self, ctx) -> None:
        self.warming_up = ctx.epoch is not None and ctx.epoch < self.imp_warmup

    def train_cascades_alone(self, batches, p_drop: float, rng: np.random.Generator, batch_size: int = 64,
                             lr: float = 1e-3) -> float:
        """One pass of the cascades alone over ``batches`` (natural masks): the missing-pattern
        simulation, L_fwd + lambda1 L_bwd with the encoders fixed (eval mode, no gradient), a step of
        the cascades' own AdamW per ``batch_size`` rows. Returns the mean loss. (``cascade_passes``.)"""
        from raypipe.train.data import simulate_missing

        params = list(self.cra_forward.parameters())
        if self.use_imp_backward:
            params += list(self.cra_backward.parameters())
        if self._cascade_opt is None:
            self._cascade_opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        total, n = 0.0, 0
        with self.encoders_in_eval():
            for batch in batches:
                x_all, full_all = batch["x"], batch["mask"]
                for start in range(0, int(full_all.shape[0]), batch_size):
                    sl = slice(start, start + batch_size)
                    x = {m: t[sl] for m, t in x_all.items()}
                    full = full_all[sl]
                    seen = simulate_missing(full, p_drop, rng) if p_drop > 0 else full
                    with torch.no_grad():
                        v = torch.cat(self.encode(x, seen), dim=1)
                        target = torch.cat(self.encode(x, full), dim=1)
                    counted = full if self.imp_forward_on == "known" else full & ~seen
                    b = int(full.shape[0])
                    v_imp, _ = self.cra_forward(v)
                    loss = self._squared_error(v_imp - target, self._position_mask(counted), b)
                    if self.use_imp_backward:
                        v_back, _ = self.cra_backward(v_imp)
                        loss = loss + self.lambda1 * self._squared_error(v_back - v, self._position_mask(seen), b)
                    self._cascade_opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 5.0)
                    self._cascade_opt.step()
                    total, n = total + float(loss.detach()) * b, n + b
        return total / max(n, 1)

    @torch.no_grad()
    def validation_imputation_nmse(self, batches, p_drop: float, seed: int, all_reduce=None) -> float:
        """The forward cascade's error on slots hidden by the simulation (the same masks for the same
        ``seed``), pooled over modalities: sum ||v'_m - h_m||^2 / sum ||h_m - mu_m||^2 over the hidden
        slots, mu_m the mean of h_m over the rows where m is known; 1.0 = predicting that mean. NaN when
        nothing is hidden. Eval mode; the sums are all-reduced across workers before the ratio."""
        from raypipe.train.data import simulate_missing

        rng = np.random.default_rng([seed, 13])
        m, d = len(self.modalities), self.hidden_dim
        # per modality: n_known, n_hidden, sum ||h||^2 hidden, sum err hidden | sum h known (D), sum h hidden (D)
        acc = torch.zeros(m, 4 + 2 * d, dtype=torch.float64)
        with self.encoders_in_eval():
            for batch in batches:
                x, full = batch["x"], batch["mask"]
                seen = simulate_missing(full, p_drop, rng) if p_drop > 0 else full
                ref = torch.stack(self.encode(x, full), dim=1).double().cpu()  # (B, M, D)
                imp = self.cra_forward(torch.cat(self.encode(x, seen), dim=1))[0].double().cpu().reshape(ref.shape)
                known = full.to(torch.float64).cpu()
                hid = (full & ~seen).to(torch.float64).cpu()
                acc[:, 0] += known.sum(0)
                acc[:, 1] += hid.sum(0)
                acc[:, 2] += ((ref ** 2).sum(2) * hid).sum(0)
                acc[:, 3] += (((imp - ref) ** 2).sum(2) * hid).sum(0)
                acc[:, 4:4 + d] += (ref * known.unsqueeze(2)).sum(0)
                acc[:, 4 + d:] += (ref * hid.unsqueeze(2)).sum(0)
        if all_reduce is not None:
            acc = all_reduce(acc)
        n_known, n_hid, sq_hid, err = acc[:, 0], acc[:, 1], acc[:, 2], acc[:, 3]
        mu = acc[:, 4:4 + d] / n_known.clamp_min(1).unsqueeze(1)
        var = sq_hid - 2 * (mu * acc[:, 4 + d:]).sum(1) + n_hid * (mu ** 2).sum(1)
        use = (n_hid > 0) & (n_known >= 2)
        if not bool(use.any()):
            return float("nan")
        return float(err[use].sum() / var[use].sum().clamp_min(1e-12))

    def early_stop_hold(self) -> bool:
        """``imp_patience``: hold the loop's early stopping while the cascade's validation NMSE still
        improves (it improved within the last ``imp_patience`` epochs)."""
        return self.imp_patience > 0 and self.use_imp_forward and self._imp_since < self.imp_patience

    def _track_validation_imputation(self, ctx) -> dict[str, Any]:
        nmse = self.validation_imputation_nmse(ctx.val_batches(), ctx.p_drop, ctx.seed, ctx.all_reduce)
        if nmse == nmse and nmse < self._imp_best * (1 - 1e-3):  # not NaN, improved by > 0.1 %
            self._imp_best, self._imp_since = nmse, 0
        else:
            self._imp_since += 1
        return {"val_imp_nmse": nmse, "imp_hold": self.early_stop_hold()}

    def on_epoch_end(self, ctx) -> dict[str, Any] | None:
        self.warming_up = False  # validation and prediction are never a warm-up pass
        if self.cascade_passes and self.use_imp_forward and ctx.train_batches is not None:
            if ctx.world_size > 1:
                raise ValueError("cascade_passes runs the cascades' own optimizer on one worker's data: "
                                 "not supported with num_workers > 1")
            rng = np.random.default_rng([ctx.seed, ctx.epoch, 7])
            with torch.enable_grad():
                for _ in range(self.cascade_passes):
                    self.train_cascades_alone(ctx.train_batches(), ctx.p_drop, rng)
        out: dict[str, Any] = {}
        if self.imp_patience > 0 and self.use_imp_forward and ctx.val_batches is not None:
            out.update(self._track_validation_imputation(ctx))
        if not self.use_tla:
            return out or None
        if self.lazy_subset is not None and ctx.epoch % self.mine_every != 0:
            return {**out, "tla": self.last_trace}  # option: mine every k epochs (the paper mines every epoch)
        d = self.subset_losses(ctx.train_batches(), ctx.all_reduce)
        self.lazy_subset = max(d, key=lambda s: (d[s], -len(s)))  # argmax (ties: the smaller subset)
        name = lambda s: "+".join(self.modalities[i] for i in s)  # noqa: E731
        self.last_trace = {"lazy": name(self.lazy_subset), "d": {name(s): v for s, v in d.items()}}
        return {**out, "tla": self.last_trace}

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"lazy_subset": list(self.lazy_subset) if self.lazy_subset is not None else None}
        if self.imp_patience > 0:  # the hold's counters: a resumed run holds as the uninterrupted one would
            state["imp_best"], state["imp_since"] = self._imp_best, self._imp_since
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        lazy = state.get("lazy_subset")
        self.lazy_subset = tuple(lazy) if lazy is not None else None
        if "imp_since" in state:
            self._imp_best, self._imp_since = float(state["imp_best"]), int(state["imp_since"])

    # ------------------------------------------------------------------ traceability
    @torch.no_grad()
    def predict_with_trace(self, x: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        v = torch.cat(self.encode(x, mask), dim=1)
        v_imp, joint_in = self.impute(v)
        logits = self.joint_head(joint_in)
        out = {"probabilities": probabilities(logits, self.task)}
        uni = [self.unimodal_heads[m](s) for m, s in zip(self.modalities, self._slices(v_imp))]
        target = predicted_target(logits, self.task)
        q = torch.stack([true_value_probability(lg, target, self.task, float(self.var_y)) for lg in uni], dim=1)
        w = down_weighting(q, self.beta) * self.trust(mask)
        for i, m in enumerate(self.modalities):
            out[f"prob_{m}"] = probabilities(uni[i], self.task)
            out[f"weight_{m}"] = w[:, i]
            out[f"imputed_{m}"] = ~mask[:, i] if self.use_imp_forward else torch.zeros_like(mask[:, i])
        return out
