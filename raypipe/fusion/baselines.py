"""The thirteen baselines of METHOD.md section 2, all on the same encoders e_m.

Decisions where the papers leave room are listed in docs/fusion.md; the main
ones are repeated next to the code that makes them.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from raypipe.fusion.base import (FusionMethod, MethodInfo, ModalitySpec, mlp, nonempty_subsets, per_sample_loss,
                                 probabilities, true_value_probability)


def _mask_f(mask: torch.Tensor) -> torch.Tensor:
    return mask.to(torch.float32)


class Concat(FusionMethod):
    info = MethodInfo("concat", "early", description="head(concat h_m)")

    def __init__(self, specs, task, n_outputs, hidden_dim=128):
        super().__init__(specs, task, n_outputs, hidden_dim)
        self.head = mlp(len(specs) * hidden_dim, hidden_dim, n_outputs)

    def forward(self, batch, full_mask=None):
        logits = self.head(torch.cat(self.encode(batch["x"], batch["mask"]), dim=1))
        out = {"logits": logits}
        if batch.get("y") is not None:
            out["loss"] = self.task_loss(logits, batch["y"])
        return out


class Sum(FusionMethod):
    info = MethodInfo("sum", "intermediate", description="head(sum_m W_m h_m)")

    def __init__(self, specs, task, n_outputs, hidden_dim=128):
        super().__init__(specs, task, n_outputs, hidden_dim)
        self.proj = nn.ModuleDict({m: nn.Linear(hidden_dim, hidden_dim) for m in self.modalities})
        self.head = mlp(hidden_dim, hidden_dim, n_outputs)

    def forward(self, batch, full_mask=None):
        hs = self.encode(batch["x"], batch["mask"])
        z = sum(self.proj[m](h) for m, h in zip(self.modalities, hs))
        logits = self.head(z)
        out = {"logits": logits}
        if batch.get("y") is not None:
            out["loss"] = self.task_loss(logits, batch["y"])
        return out


class Late(FusionMethod):
    """Decision-level: mean of the unimodal heads' probabilities over the *available* modalities
    [decision: averaging in a missing modality's e_m(0) guess would add noise]; each head trained by its loss."""

    info = MethodInfo("late", "late", description="mean_m softmax(g_m(h_m))")

    def __init__(self, specs, task, n_outputs, hidden_dim=128):
        super().__init__(specs, task, n_outputs, hidden_dim)
        self.heads = nn.ModuleDict({m: mlp(hidden_dim, hidden_dim, n_outputs) for m in self.modalities})

    def _uni(self, x, mask):
        return [self.heads[m](h) for m, h in zip(self.modalities, self.encode(x, mask))]

    def _combine(self, uni, mask):
        w = _mask_f(mask)
        w = w / w.sum(dim=1, keepdim=True).clamp_min(1.0)
        probs = torch.stack([probabilities(lg, self.task) for lg in uni], dim=1)  # (B, M, K)
        return (probs * w.unsqueeze(-1)).sum(dim=1)

    def forward(self, batch, full_mask=None):
        uni = self._uni(batch["x"], batch["mask"])
        p = self._combine(uni, batch["mask"])
        logits = p.clamp_min(1e-7).log() if self.task in ("binary", "multiclass") else (
            torch.logit(p.clamp(1e-6, 1 - 1e-6)) if self.task == "multilabel" else p)
        out = {"logits": logits}
        if batch.get("y") is not None:
            m = _mask_f(batch["mask"])
            losses = torch.stack([per_sample_loss(lg, batch["y"], self.task) for lg in uni], dim=1)
            out["loss"] = ((losses * m).sum(1) / m.sum(1).clamp_min(1.0)).mean()
        return out

    @torch.no_grad()
    def predict_with_trace(self, x, mask):
        uni = self._uni(x, mask)
        out = {"probabilities": self._combine(uni, mask)}
        for m, lg in zip(self.modalities, uni):
            out[f"prob_{m}"] = probabilities(lg, self.task)
        return out


class SEGate(FusionMethod):
    """MMTM-style squeeze-excitation: s = ReLU(W[h]); h_m' = h_m * sigmoid(W_m s)."""

    info = MethodInfo("se_gate", "intermediate", description="squeeze-excitation gating")

    def __init__(self, specs, task, n_outputs, hidden_dim=128):
        super().__init__(specs, task, n_outputs, hidden_dim)
        m = len(specs)
        self.squeeze = nn.Linear(m * hidden_dim, max(8, m * hidden_dim // 4))
        self.excite = nn.ModuleDict({k: nn.Linear(max(8, m * hidden_dim // 4), hidden_dim) for k in self.modalities})
        self.head = mlp(m * hidden_dim, hidden_dim, n_outputs)

    def forward(self, batch, full_mask=None):
        hs = self.encode(batch["x"], batch["mask"])
        s = F.relu(self.squeeze(torch.cat(hs, dim=1)))
        gated = [h * torch.sigmoid(self.excite[m](s)) for m, h in zip(self.modalities, hs)]
        logits = self.head(torch.cat(gated, dim=1))
        out = {"logits": logits}
        if batch.get("y") is not None:
            out["loss"] = self.task_loss(logits, batch["y"])
        return out


class Attention(FusionMethod):
    """a = softmax_m(u^T tanh(W h_m)) over available modalities; head(sum a_m h_m)."""

    info = MethodInfo("attention", "attention", description="additive attention over modalities")

    def __init__(self, specs, task, n_outputs, hidden_dim=128):
        super().__init__(specs, task, n_outputs, hidden_dim)
        self.W = nn.Linear(hidden_dim, hidden_dim)
        self.u = nn.Linear(hidden_dim, 1, bias=False)
        self.head = mlp(hidden_dim, hidden_dim, n_outputs)

    def attend(self, hs, mask):
        H = torch.stack(hs, dim=1)  # (B, M, D)
        scores = self.u(torch.tanh(self.W(H))).squeeze(-1).masked_fill(~mask, float("-inf"))
        a = scores.softmax(dim=1)
        return (a.unsqueeze(-1) * H).sum(dim=1), a

    def forward(self, batch, full_mask=None):
        z, a = self.attend(self.encode(batch["x"], batch["mask"]), batch["mask"])
        logits = self.head(z)
        out = {"logits": logits, "attention": a}
        if batch.get("y") is not None:
            out["loss"] = self.task_loss(logits, batch["y"])
        return out

    @torch.no_grad()
    def predict_with_trace(self, x, mask):
        z, a = self.attend(self.encode(x, mask), mask)
        out = {"probabilities": probabilities(self.head(z), self.task)}
        for i, m in enumerate(self.modalities):
            out[f"weight_{m}"] = a[:, i]
        return out


class TransformerFusion(FusionMethod):
    """Modality tokens + learned modality embeddings, missing tokens masked out of attention,
    2-layer Transformer encoder, mean of the valid tokens -> head."""

    info = MethodInfo("transformer", "attention", description="Transformer over modality tokens")

    def __init__(self, specs, task, n_outputs, hidden_dim=128, heads: int = 4, layers: int = 2):
        super().__init__(specs, task, n_outputs, hidden_dim)
        heads = heads if hidden_dim % heads == 0 else 1
        self.modality_embedding = nn.Parameter(torch.randn(len(specs), hidden_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(hidden_dim, heads, dim_feedforward=2 * hidden_dim, dropout=0.1,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = mlp(hidden_dim, hidden_dim, n_outputs)

    def forward(self, batch, full_mask=None):
        mask = batch["mask"]
        tokens = torch.stack(self.encode(batch["x"], mask), dim=1) + self.modality_embedding
        z = self.encoder(tokens, src_key_padding_mask=~mask)
        m = _mask_f(mask).unsqueeze(-1)
        pooled = (z * m).sum(1) / m.sum(1).clamp_min(1.0)
        logits = self.head(pooled)
        out = {"logits": logits}
        if batch.get("y") is not None:
            out["loss"] = self.task_loss(logits, batch["y"])
        return out


class TensorFusion(FusionMethod):
    """TFN: head(flatten(outer([1;h_1], ..., [1;h_M]))) with h reduced to 16-d, plus the DF-DM
    skip connection from the unimodal outputs (the fused logits add the unimodal heads' logits)."""

    info = MethodInfo("tensor", "tensor", description="tensor fusion (TFN) + unimodal skip")
    REDUCED = 16

    def __init__(self, specs, task, n_outputs, hidden_dim=128):
        super().__init__(specs, task, n_outputs, hidden_dim)
        # keep (r+1)^M manageable: 16-d up to M = 4 (METHOD), then the largest r with (r+1)^M <= 1e5
        r = self.REDUCED if len(specs) <= 4 else max(1, int(round(1e5 ** (1 / len(specs)), 6)) - 1)
        self.reduce = nn.ModuleDict({m: nn.Linear(hidden_dim, r) for m in self.modalities})
        self.head = mlp((r + 1) ** len(specs), 64, n_outputs)
        self.uni = nn.ModuleDict({m: nn.Linear(hidden_dim, n_outputs) for m in self.modalities})

    def forward(self, batch, full_mask=None):
        hs = self.encode(batch["x"], batch["mask"])
        z = None
        for m, h in zip(self.modalities, hs):
            zi = torch.cat([h.new_ones(h.shape[0], 1), self.reduce[m](h)], dim=1)
            z = zi if z is None else torch.einsum("bi,bj->bij", z, zi).flatten(1)
        logits = self.head(z) + sum(self.uni[m](h) for m, h in zip(self.modalities, hs))
        out = {"logits": logits}
        if batch.get("y") is not None:
            out["loss"] = self.task_loss(logits, batch["y"])
        return out


class CLUB(nn.Module):
    """Contrastive log-ratio upper bound of I(u; s) (Cheng et al., ICML 2020) with a Gaussian q(s|u).

    Two roles, two losses, as in the paper's alternating scheme: the q-network (``mu``, ``logvar``)
    is fitted by its own log-likelihood on *detached* samples (:meth:`learning_loss`), and the
    encoders that produce u and s minimise the bound evaluated with the q-network *frozen*
    (:meth:`upper_bound`). With one optimiser over all parameters this is what keeps the bound
    from training q: the bound's gradient reaches u and s only, the likelihood's reaches q only.
    """

    def __init__(self, d: int):
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.logvar = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.Tanh())

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(u), self.logvar(u)

    def _frozen(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q's outputs with its parameters detached: gradients flow to ``u``, never into q."""
        params = {k: v.detach() for k, v in self.named_parameters()}
        return torch.func.functional_call(self, params, (u,))

    def log_likelihood(self, u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Mean over samples of log q(s|u) up to constants (x2), summed over dimensions."""
        mu, logvar = self(u)
        return (-((s - mu) ** 2) / logvar.exp() - logvar).sum(dim=1).mean()

    def learning_loss(self, u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """What fits q: the negative log-likelihood on detached samples, per dimension (its scale does
        not grow with the width, so it does not dominate the loop's global gradient-norm clip)."""
        return -self.log_likelihood(u.detach(), s.detach()) / u.shape[1]

    def upper_bound(self, u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """CLUB estimate: mean_i [log q(s_i|u_i) - mean_j log q(s_j|u_i)], q frozen."""
        mu, logvar = self._frozen(u)
        positive = -((s - mu) ** 2) / 2 / logvar.exp()
        negative = -((s.unsqueeze(0) - mu.unsqueeze(1)) ** 2).mean(dim=1) / 2 / logvar.exp()
        return (positive.sum(-1) - negative.sum(-1)).mean()


class DisentangledDenseFusion(FusionMethod):
    """DF-DM ddf: shared s_m and specific u_m per modality; shared pulled to their mean (MSE);
    specific made independent of shared by minimising CLUB(u_m; s_m) weighted by lambda_mi;
    fused = dense layers over concat(mean_m s_m, u_1..u_M) + skip from the unimodal outputs."""

    info = MethodInfo("ddf", "intermediate", description="disentangled dense fusion (DF-DM) with CLUB")

    def __init__(self, specs, task, n_outputs, hidden_dim=128, lambda_mi: float = 0.1, lambda_shared: float = 1.0):
        super().__init__(specs, task, n_outputs, hidden_dim)
        if not 0 <= lambda_mi <= 1:
            raise ValueError(f"ddf: lambda_mi must be in [0, 1], got {lambda_mi}")
        d = hidden_dim
        self.lambda_mi, self.lambda_shared = lambda_mi, lambda_shared
        self.shared = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, d), nn.ReLU()) for m in self.modalities})
        self.specific = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, d), nn.ReLU()) for m in self.modalities})
        self.club = nn.ModuleDict({m: CLUB(d) for m in self.modalities})
        self.dense = nn.Sequential(nn.Linear((len(specs) + 1) * d, 2 * d), nn.ReLU(), nn.Dropout(0.1),
                                   nn.Linear(2 * d, d), nn.ReLU(), nn.Linear(d, n_outputs))
        self.uni = nn.ModuleDict({m: nn.Linear(d, n_outputs) for m in self.modalities})

    def forward(self, batch, full_mask=None):
        mask = batch["mask"]
        hs = self.encode(batch["x"], mask)
        s = [self.shared[m](h) for m, h in zip(self.modalities, hs)]
        u = [self.specific[m](h) for m, h in zip(self.modalities, hs)]
        mf = _mask_f(mask).unsqueeze(-1)
        S = torch.stack(s, dim=1)
        s_mean = (S * mf).sum(1) / mf.sum(1).clamp_min(1.0)
        logits = self.dense(torch.cat([s_mean] + u, dim=1)) + sum(self.uni[m](h) for m, h in zip(self.modalities, hs))
        out = {"logits": logits}
        if batch.get("y") is not None:
            task = self.task_loss(logits, batch["y"])
            shared = (((S - s_mean.unsqueeze(1).detach()) ** 2).mean(-1) * mf.squeeze(-1)).sum() / mf.sum().clamp_min(1)
            # CLUB on the rows where the modality is present (an absent one's e_m(0) carries no
            # information to disentangle); the encoders see only the bound (q frozen inside it),
            # q sees only its likelihood on detached features (METHOD 2, ddf)
            mi_terms, fit_terms = [], []
            for i, m in enumerate(self.modalities):
                rows = mask[:, i]
                if int(rows.sum()) < 2:
                    continue
                mi_terms.append(self.club[m].upper_bound(u[i][rows], s[i][rows]))
                fit_terms.append(self.club[m].learning_loss(u[i][rows], s[i][rows]))
            zero = logits.sum() * 0.0
            mi = torch.stack(mi_terms).mean() if mi_terms else zero
            fit_q = torch.stack(fit_terms).mean() if fit_terms else zero
            out["loss"] = task + self.lambda_shared * shared + self.lambda_mi * mi + fit_q
            out["loss_mi"] = mi.detach()
        return out


class GBlend(FusionMethod):
    """G-Blend (Wang et al., CVPR 2020): loss sum_k w_k L_k over the unimodal heads and the fused
    head; w_k proportional to dG_k / dO_k^2 measured on the validation split every ``gb_epoch`` epochs
    (G = validation loss decrease, O = change of the train-validation gap), normalised to sum to 1."""

    info = MethodInfo("gblend", "training-strategy", hooks=("on_epoch_end",), description="gradient blending")

    def __init__(self, specs, task, n_outputs, hidden_dim=128, gb_epoch: int = 2):
        super().__init__(specs, task, n_outputs, hidden_dim)
        self.gb_epoch = gb_epoch
        self.uni = nn.ModuleDict({m: mlp(hidden_dim, hidden_dim, n_outputs) for m in self.modalities})
        self.fused = mlp(len(specs) * hidden_dim, hidden_dim, n_outputs)
        k = len(specs) + 1
        self.register_buffer("blend", torch.full((k,), 1.0 / k))
        self._last: torch.Tensor | None = None  # (train losses, val losses) at the previous estimate

    def _all_logits(self, x, mask):
        hs = self.encode(x, mask)
        return [self.uni[m](h) for m, h in zip(self.modalities, hs)] + [self.fused(torch.cat(hs, dim=1))]

    def forward(self, batch, full_mask=None):
        lg = self._all_logits(batch["x"], batch["mask"])
        out = {"logits": lg[-1]}
        if batch.get("y") is not None:
            losses = torch.stack([per_sample_loss(l, batch["y"], self.task).mean() for l in lg])
            out["loss"] = (self.blend * losses).sum()
        return out

    @torch.no_grad()
    def _losses(self, batches, all_reduce):
        sums, n = torch.zeros(len(self.modalities) + 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        for b in batches:
            lg = self._all_logits(b["x"], b["mask"])
            sums += torch.stack([per_sample_loss(l, b["y"], self.task).sum() for l in lg]).double().cpu()
            n += len(b["y"])
        if all_reduce is not None:
            both = all_reduce(torch.cat([sums, n]))
            sums, n = both[:-1], both[-1:]
        return sums / n.clamp_min(1)

    @staticmethod
    def blend_weights(prev_train, prev_val, train, val) -> torch.Tensor:
        """w_k ∝ dG_k / dO_k^2 (clamped at >= 0), normalised to sum to 1."""
        d_g = (prev_val - val).clamp_min(0)
        d_o = ((val - train) - (prev_val - prev_train)).abs().clamp_min(1e-6)
        w = d_g / d_o ** 2
        if not torch.isfinite(w).all() or w.sum() <= 0:
            return torch.full_like(w, 1.0 / len(w))
        return w / w.sum()

    def on_epoch_end(self, ctx):
        if (ctx.epoch + 1) % self.gb_epoch != 0 or ctx.val_batches is None:
            return None
        was = self.training
        self.eval()
        train, val = self._losses(ctx.train_batches(), ctx.all_reduce), self._losses(ctx.val_batches(), ctx.all_reduce)
        self.train(was)
        if self._last is not None:
            self.blend.copy_(self.blend_weights(self._last[0], self._last[1], train, val).to(self.blend))
        self._last = torch.stack([train, val])
        return {"gblend_weights": [round(float(w), 4) for w in self.blend]}

    def extra_state(self):
        return {"last": None if self._last is None else self._last.tolist()}

    def load_extra_state(self, state):
        self._last = None if state.get("last") is None else torch.tensor(state["last"], dtype=torch.float64)


class OGMGE(FusionMethod):
    """OGM-GE (Peng et al., CVPR 2022) generalised to M modalities: a linear fused head
    out = sum_m W_m h_m + b, unimodal contributions out_m = W_m h_m + b/M; s_m = sum_i softmax(out_m)_i[y_i];
    rho_m = s_m / mean_{n != m} s_n [decision for M > 2; = s_a/s_b for two]. Encoder gradients of every
    dominant modality (rho_m > 1) are scaled by 1 - tanh(alpha (rho_m - 1)) and get Gaussian noise with the
    gradient's std (GE); the others are left unscaled.

    Under DDP the gradients are already averaged over workers when ``on_after_backward`` runs, so
    every worker must apply the *same* coefficient and the *same* noise or the replicas drift apart:
    the per-batch scores s_m are summed with ``ctx.all_reduce`` before rho is formed, and the noise
    comes from a generator seeded by (ctx.seed, epoch, step), identical on every worker."""

    info = MethodInfo("ogm_ge", "training-strategy", hooks=("on_epoch_start", "on_after_backward"),
                      tasks=("binary", "multiclass", "multilabel", "regression"),
                      description="on-the-fly gradient modulation + generalisation enhancement")

    def __init__(self, specs, task, n_outputs, hidden_dim=128, alpha: float = 0.5, noise: bool = True):
        super().__init__(specs, task, n_outputs, hidden_dim)
        self.alpha, self.noise = alpha, noise
        self.W = nn.ModuleDict({m: nn.Linear(hidden_dim, n_outputs, bias=False) for m in self.modalities})
        self.bias = nn.Parameter(torch.zeros(n_outputs))
        self.scores: torch.Tensor | None = None  # s_m of the last training batch (local to this worker)
        self.coefficients: dict[int, float] = {i: 1.0 for i in range(len(self.modalities))}
        self._step = 0

    def forward(self, batch, full_mask=None):
        hs = self.encode(batch["x"], batch["mask"])
        contrib = [self.W[m](h) for m, h in zip(self.modalities, hs)]
        logits = sum(contrib) + self.bias
        out = {"logits": logits}
        if batch.get("y") is not None:
            out["loss"] = self.task_loss(logits, batch["y"])
            with torch.no_grad():
                M = len(self.modalities)
                self.scores = torch.stack([
                    true_value_probability(c + self.bias / M, batch["y"], self.task, float(self.var_y)).sum()
                    for c in contrib]).double().cpu()
        return out

    @staticmethod
    def modulation(s: torch.Tensor, alpha: float, names: Sequence[str] | None = None) -> dict:
        """{modality index or name: coefficient}: 1 - tanh(alpha (rho - 1)) if rho > 1 else 1."""
        m = len(s)
        out = {}
        for i in range(m):
            others = torch.cat([s[:i], s[i + 1:]]).mean()
            rho = float(s[i] / others.clamp_min(1e-12))
            out[i if names is None else names[i]] = 1 - math.tanh(alpha * (rho - 1)) if rho > 1 else 1.0
        return out

    def on_epoch_start(self, ctx):
        self._step = 0

    def on_after_backward(self, ctx):
        if self.scores is None:
            return
        s = self.scores if ctx.all_reduce is None else ctx.all_reduce(self.scores.clone())
        self.coefficients = self.modulation(s, self.alpha)
        self.scores = None
        gen = torch.Generator().manual_seed(((int(ctx.seed) * 1_000_003 + int(ctx.epoch)) * 1_000_003 + self._step) % 2**31)
        self._step += 1
        for i, m in enumerate(self.modalities):
            k = self.coefficients.get(i, 1.0)
            if k >= 1.0:
                continue
            for p in self.encoders[m].parameters():
                if p.grad is None:
                    continue
                p.grad.mul_(k)
                if self.noise and p.grad.numel() > 1:
                    # drawn on the CPU from the shared generator, so every worker adds the same noise
                    eps = torch.randn(p.grad.shape, generator=gen, dtype=p.grad.dtype)
                    p.grad.add_(eps.to(p.grad.device) * p.grad.std())


class PMR(FusionMethod):
    """PMR (Fan et al., CVPR 2023): class prototypes per modality c_{m,k} (updated at each epoch start
    from the class means of h_m: c <- 0.2 c + 0.8 mean [decision: momentum 0.2 on the old value]);
    prototype logits -||h_m - c_k||, prototype distribution p_m = softmax(-||h_m - c_k||).

    Two terms on top of the fused task loss, both steered by the prototype scores
    s_m = mean over the batch's samples that have modality m of p_m[y]:

    * prototypical cross-entropy (PCE), weight ``alpha``, on every *weaker* modality
      (s_m below the mean of the others' scores): pulls its features towards its class prototypes;
    * prototypical entropy regularisation (PER), weight ``entropy_weight`` (mu), on every
      *dominant* modality (s_m above the others' mean), during the first ``entropy_epochs`` epochs
      only: the loss *subtracts* mu * H(p_m), so the dominant modality is kept from becoming
      over-confident early and leaving the weaker ones no gradient. [decision: mu = 0.1 and
      10 epochs are this project's defaults, not the paper's; ``entropy_weight=0`` turns PER off.]
    """

    info = MethodInfo("pmr", "training-strategy", hooks=("on_epoch_start",), tasks=("binary", "multiclass"),
                      description="prototypical modal rebalance")

    def __init__(self, specs, task, n_outputs, hidden_dim=128, alpha: float = 1.0, momentum: float = 0.2,
                 entropy_weight: float = 0.1, entropy_epochs: int = 10):
        super().__init__(specs, task, n_outputs, hidden_dim)
        if entropy_weight < 0:
            raise ValueError(f"pmr: entropy_weight must be >= 0, got {entropy_weight}")
        self.alpha, self.momentum = alpha, momentum
        self.entropy_weight, self.entropy_epochs = entropy_weight, entropy_epochs
        self.head = mlp(len(specs) * hidden_dim, hidden_dim, n_outputs)
        self.register_buffer("prototypes", torch.zeros(len(specs), n_outputs, hidden_dim))
        self.register_buffer("initialised", torch.tensor(False))
        self.epoch = 0  # set by on_epoch_start from the loop's context (PER runs in early epochs only)

    def prototype_logits(self, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        """-||h_m - c_{m,k}|| for every modality: (B, K) each."""
        return [-torch.cdist(h, self.prototypes[i]) for i, h in enumerate(hs)]

    @staticmethod
    def prototype_scores(proto_logits: list[torch.Tensor], y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """s_m: mean probability of the true class under modality m's prototypes, over its present rows."""
        scores = []
        for i, pl in enumerate(proto_logits):
            rows = mask[:, i]
            p = pl[rows].softmax(-1).gather(1, y[rows].long().view(-1, 1))
            scores.append(p.mean() if rows.any() else pl.new_tensor(float("nan")))
        return torch.stack(scores)

    def forward(self, batch, full_mask=None):
        mask, y = batch["mask"], batch.get("y")
        hs = self.encode(batch["x"], mask)
        logits = self.head(torch.cat(hs, dim=1))
        out = {"logits": logits}
        if y is not None:
            loss = self.task_loss(logits, y)
            if bool(self.initialised):
                proto_logits = self.prototype_logits(hs)
                with torch.no_grad():
                    s = self.prototype_scores(proto_logits, y, mask)
                per_active = self.entropy_weight > 0 and self.epoch < self.entropy_epochs
                entropy_sum = logits.new_zeros(())
                for i, pl in enumerate(proto_logits):
                    sel = mask[:, i]
                    others = torch.cat([s[:i], s[i + 1:]])
                    others = others[~torch.isnan(others)]
                    if not sel.any() or len(others) == 0:
                        continue
                    if s[i] < others.mean():  # a weaker modality: prototypical cross-entropy
                        loss = loss + self.alpha * F.cross_entropy(pl[sel], y[sel].long())
                    elif per_active and s[i] > others.mean():  # a dominant one: entropy regulariser
                        logp = pl[sel].log_softmax(-1)
                        entropy = -(logp.exp() * logp).sum(-1).mean()
                        entropy_sum = entropy_sum + entropy.detach()
                        loss = loss - self.entropy_weight * entropy
                out["loss_pmr_entropy"] = entropy_sum
            out["loss"] = loss
        return out

    @torch.no_grad()
    def on_epoch_start(self, ctx):
        self.epoch = int(ctx.epoch)
        M, K, D = self.prototypes.shape
        sums = torch.zeros(M, K, D, dtype=torch.float64)
        counts = torch.zeros(M, K, dtype=torch.float64)
        was = self.training
        self.eval()
        for b in ctx.train_batches():
            hs = self.encode(b["x"], b["mask"])
            onehot = F.one_hot(b["y"].long(), K).double().cpu()
            for i, h in enumerate(hs):
                w = onehot * b["mask"][:, i].double().cpu().unsqueeze(1)
                sums[i] += w.T @ h.double().cpu()
                counts[i] += w.sum(0)
        self.train(was)
        if ctx.all_reduce is not None:
            both = ctx.all_reduce(torch.cat([sums.flatten(), counts.flatten()]))
            sums, counts = both[:M * K * D].view(M, K, D), both[M * K * D:].view(M, K)
        mean = (sums / counts.clamp_min(1).unsqueeze(-1)).to(self.prototypes)
        if bool(self.initialised):
            self.prototypes.mul_(self.momentum).add_((1 - self.momentum) * mean)
        else:
            self.prototypes.copy_(mean)
            self.initialised.fill_(True)


class MedFuse(FusionMethod):
    """MedFuse (Hayat et al., MLHC 2022): the available modalities' projected encodings in a fixed order
    form a sequence through an LSTM(-> 512); the last hidden state feeds the head."""

    info = MethodInfo("medfuse", "intermediate", description="LSTM over the available modality tokens")

    def __init__(self, specs, task, n_outputs, hidden_dim=128, lstm_hidden: int = 512):
        super().__init__(specs, task, n_outputs, hidden_dim)
        self.proj = nn.ModuleDict({m: nn.Linear(hidden_dim, hidden_dim) for m in self.modalities})
        self.lstm = nn.LSTM(hidden_dim, lstm_hidden, batch_first=True)
        self.head = mlp(lstm_hidden, hidden_dim, n_outputs)

    def forward(self, batch, full_mask=None):
        mask = batch["mask"]
        hs = [self.proj[m](h) for m, h in zip(self.modalities, self.encode(batch["x"], mask))]
        H = torch.stack(hs, dim=1)  # (B, M, D)
        # move each sample's available tokens to the front, keeping modality order
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        H = H.gather(1, order.unsqueeze(-1).expand_as(H))
        lengths = mask.sum(1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(H, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        logits = self.head(h_n[-1])
        out = {"logits": logits}
        if batch.get("y") is not None:
            out["loss"] = self.task_loss(logits, batch["y"])
        return out


class MetaFusion(FusionMethod):
    """Meta Fusion (Liang et al., 2025): a cohort of students, one per non-empty subset of modality
    latents; each trained with its task loss + rho * KL to the detached other students (uniform weights
    over the others [decision]); the prediction is the ensemble weighted by softmax(-validation loss),
    re-estimated at each epoch end."""

    info = MethodInfo("metafusion", "training-strategy", hooks=("on_epoch_end",),
                      tasks=("binary", "multiclass", "multilabel", "regression"), description="cohort mutual learning")

    def __init__(self, specs, task, n_outputs, hidden_dim=128, rho: float = 0.5, temperature: float = 0.1):
        super().__init__(specs, task, n_outputs, hidden_dim)
        self.subsets = nonempty_subsets(len(specs))
        self.rho, self.temperature = rho, temperature
        self.students = nn.ModuleList(mlp(len(s) * hidden_dim, hidden_dim, n_outputs) for s in self.subsets)
        self.register_buffer("ensemble", torch.full((len(self.subsets),), 1.0 / len(self.subsets)))

    def _student_logits(self, x, mask):
        hs = self.encode(x, mask)
        return [st(torch.cat([hs[i] for i in s], dim=1)) for st, s in zip(self.students, self.subsets)]

    def _combine(self, logits):
        probs = torch.stack([probabilities(l, self.task) for l in logits], dim=0)  # (S, B, K)
        return (self.ensemble.view(-1, 1, 1) * probs).sum(0)

    def forward(self, batch, full_mask=None):
        lg = self._student_logits(batch["x"], batch["mask"])
        p = self._combine(lg)
        logits = p.clamp_min(1e-7).log() if self.task in ("binary", "multiclass") else (
            torch.logit(p.clamp(1e-6, 1 - 1e-6)) if self.task == "multilabel" else p)
        out = {"logits": logits}
        y = batch.get("y")
        if y is not None:
            task = torch.stack([per_sample_loss(l, y, self.task).mean() for l in lg])
            mutual = []
            if self.task in ("binary", "multiclass") and len(lg) > 1:
                logp = [l.log_softmax(-1) for l in lg]
                for i in range(len(lg)):
                    kl = [F.kl_div(logp[i], logp[j].detach(), log_target=True, reduction="batchmean")
                          for j in range(len(lg)) if j != i]
                    mutual.append(torch.stack(kl).mean())
            elif len(lg) > 1:  # regression / multilabel: squared distance to the others' mean
                stacked = torch.stack(lg)
                for i in range(len(lg)):
                    others = torch.cat([stacked[:i], stacked[i + 1:]]).detach().mean(0)
                    mutual.append(((lg[i] - others) ** 2).mean())
            out["loss"] = task.sum() + self.rho * (torch.stack(mutual).sum() if mutual else 0.0)
        return out

    @torch.no_grad()
    def on_epoch_end(self, ctx):
        if ctx.val_batches is None:
            return None
        sums = torch.zeros(len(self.students), dtype=torch.float64)
        n = torch.zeros(1, dtype=torch.float64)
        was = self.training
        self.eval()
        for b in ctx.val_batches():
            lg = self._student_logits(b["x"], b["mask"])
            sums += torch.stack([per_sample_loss(l, b["y"], self.task).sum() for l in lg]).double().cpu()
            n += len(b["y"])
        self.train(was)
        if ctx.all_reduce is not None:
            both = ctx.all_reduce(torch.cat([sums, n]))
            sums, n = both[:-1], both[-1:]
        loss = sums / n.clamp_min(1)
        self.ensemble.copy_(torch.softmax(-loss / self.temperature, dim=0).to(self.ensemble))
        return {"metafusion_val_losses": [round(float(v), 4) for v in loss]}


BASELINES: dict[str, type[FusionMethod]] = {
    "concat": Concat, "sum": Sum, "late": Late, "se_gate": SEGate, "attention": Attention,
    "transformer": TransformerFusion, "tensor": TensorFusion, "ddf": DisentangledDenseFusion, "gblend": GBlend,
    "ogm_ge": OGMGE, "pmr": PMR, "medfuse": MedFuse, "metafusion": MetaFusion,
}
