"""Multimodal VAE with a product-of-experts posterior (Wu & Goodman, NeurIPS 2018), supervised.

Generative fusion (the survey's "variational autoencoders for multi-modal learning"):
every modality m has a Gaussian expert q(z | x_m) = N(mu_m, sigma_m^2) on a shared latent,
and the posterior given any subset S of modalities is the product of the experts in S and
the prior expert N(0, I):

    precision T = 1 + sum_{m in S} 1 / sigma_m^2,
    mean      mu = (sum_{m in S} mu_m / sigma_m^2) / T,    variance 1 / T     (per latent dimension)

so a patient with any pattern of missing modalities has a posterior without a fill-in value:
an absent modality simply contributes no factor. One decoder per modality maps z back to
the modality (its standardised embedding; a sequence's flattened values), which is what
``imputed_<m>`` means for this method: the decoder's reconstruction from the posterior of
the modalities present (:meth:`MVAE.impute`). A prediction head reads the posterior mean.

Objective (the paper's sub-sampled training, plus the task):

    L = task(head(mu_seen), y) + lambda_elbo * mean_S [ -ELBO_S ] / n_features

over S = the sample's full available set, each single available modality, the subset the
loop's missing-pattern simulation left ("seen"), and ``n_subsets`` further random subsets;
-ELBO_S = sum_{m in S} -log N(x_m; dec_m(z_S), diag(s_m^2)) + kl_weight * KL(q_S || N(0, I)),
z_S sampled by reparameterisation. The decoders' observation variances s_m^2 are learned per
feature, start at 0.1 and are floored at ``MIN_OBS_VAR`` (standardised units). Why: with a
unit variance on standardised inputs a Gaussian VAE sits at the probabilistic-PCA threshold
(data variance = noise variance), where encoding gains nothing; we measured it (posterior
variance 0.87 of the prior's 1, a modality decoded from its own expert with 91 % of its
variance left, its linearly redundant partner with 94 %), and a learned variance starting at
1 escapes that saddle only slowly (experts' variances still 10-150 after 400 steps). Starting
at 0.1 the same test imputes the redundant modality with 6-8 % of its variance left. Each ELBO term reconstructs only the modalities of its subset
(as in the paper); cross-modal generation comes from the shared latent. ``kl_weight`` is
annealed linearly from 1/kl_anneal_epochs to 1 over the first epochs (the paper anneals the
KL term too), set by the ``on_epoch_start`` hook from the epoch number, so DDP workers agree.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn

from raypipe.fusion.base import FusionMethod, MethodInfo, ModalitySpec, mlp, per_sample_loss, probabilities
from raypipe.fusion.encoders import reconstruction_target

LOGVAR_RANGE = 8.0  # experts' log-variance clamped to [-8, 8]: precisions within e^{+-8}
LOG_2PI = math.log(2 * math.pi)
MIN_OBS_VAR = 1e-2  # floor of the decoders' learned observation variance (standardised units)


def product_of_experts(mu: torch.Tensor, logvar: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian product of the experts marked present, per sample and latent dimension.

    ``mu``, ``logvar``: (..., E, Z) expert means and log-variances; ``present``: (..., E) bool.
    Returns (mean, log-variance), each (..., Z), of the normalised product
    prod_{e present} N(mu_e, exp(logvar_e)). An absent expert contributes nothing, whatever its
    values (NaN included). At least one expert must be present (callers include the prior).
    """
    keep = present.unsqueeze(-1)
    precision = torch.where(keep, torch.exp(-logvar), torch.zeros_like(logvar))
    weighted = torch.where(keep, mu, torch.zeros_like(mu)) * precision
    total = precision.sum(dim=-2)
    return weighted.sum(dim=-2) / total, -torch.log(total)


def gaussian_kl_to_standard(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the last dimension."""
    return 0.5 * (mu ** 2 + logvar.exp() - 1.0 - logvar).sum(dim=-1)


class MVAE(FusionMethod):
    info = MethodInfo("mvae", "generative", hooks=("on_epoch_start",),
                      description="multimodal VAE, product-of-experts posterior + head (Wu & Goodman 2018)")

    def __init__(self, specs: Sequence[ModalitySpec], task: str, n_outputs: int, hidden_dim: int = 128,
                 latent_dim: int = 32, lambda_elbo: float = 1.0, n_subsets: int = 1, kl_anneal_epochs: int = 5):
        super().__init__(specs, task, n_outputs, hidden_dim)
        if latent_dim < 1:
            raise ValueError(f"mvae: latent_dim must be >= 1, got {latent_dim}")
        if lambda_elbo < 0 or n_subsets < 0 or kl_anneal_epochs < 0:
            raise ValueError("mvae: lambda_elbo, n_subsets and kl_anneal_epochs must be >= 0")
        self.latent_dim, self.lambda_elbo = latent_dim, lambda_elbo
        self.n_subsets, self.kl_anneal_epochs = n_subsets, kl_anneal_epochs
        d = hidden_dim
        self.experts = nn.ModuleDict({m: nn.Linear(d, 2 * latent_dim) for m in self.modalities})
        self.target_dims = {s.name: int(torch.tensor(s.shape).prod()) for s in self.specs}
        self.decoders = nn.ModuleDict({m: mlp(latent_dim, max(d, 64), self.target_dims[m]) for m in self.modalities})
        self.obs_logvar = nn.ParameterDict({m: nn.Parameter(torch.full((self.target_dims[m],), math.log(0.1)))
                                            for m in self.modalities})
        self.head = mlp(latent_dim, d, n_outputs)
        self.kl_weight = self._annealed(0)

    # ------------------------------------------------------------------ posterior
    def expert_parameters(self, hs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar), each (B, 1 + M, Z): the prior expert N(0, I) first, then one per modality."""
        params = torch.stack([self.experts[m](h) for m, h in zip(self.modalities, hs)], dim=1).float()
        mu, logvar = params.chunk(2, dim=-1)
        logvar = logvar.clamp(-LOGVAR_RANGE, LOGVAR_RANGE)
        zeros = mu.new_zeros(mu.shape[0], 1, mu.shape[2])
        return torch.cat([zeros, mu], dim=1), torch.cat([zeros, logvar], dim=1)

    @staticmethod
    def with_prior(mask: torch.Tensor) -> torch.Tensor:
        """(..., M) modality mask -> (..., 1 + M) expert mask with the prior always present."""
        return torch.cat([torch.ones_like(mask[..., :1]), mask], dim=-1)

    def posterior(self, x: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | the modalities present in ``mask``): (mean, log-variance), each (B, Z)."""
        mu_e, logvar_e = self.expert_parameters(self.encode(x, mask))
        return product_of_experts(mu_e, logvar_e, self.with_prior(mask))

    # ------------------------------------------------------------------ training
    def _annealed(self, epoch: int) -> float:
        return 1.0 if self.kl_anneal_epochs <= 0 else min(1.0, (epoch + 1) / self.kl_anneal_epochs)

    def _random_subsets(self, avail: torch.Tensor) -> torch.Tensor:
        """(n_subsets, B, M): each available modality kept with probability 1/2, at least one kept."""
        out = []
        for _ in range(self.n_subsets):
            keep = avail & (torch.rand(avail.shape, device=avail.device) < 0.5)
            empty = ~keep.any(dim=1) & avail.any(dim=1)
            if empty.any():  # restore one available modality, chosen uniformly
                score = torch.rand(avail.shape, device=avail.device).masked_fill(~avail, -1.0)
                one = nn.functional.one_hot(score.argmax(dim=1), avail.shape[1]).bool()
                keep = torch.where(empty.unsqueeze(1), one, keep)
            out.append(keep)
        return torch.stack(out) if out else avail.new_zeros((0, *avail.shape))

    def negative_elbo(self, mu_e, logvar_e, subsets: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        """Mean over subsets and samples of -ELBO_S per target feature; ``subsets``: (P, B, M) bool."""
        mu, logvar = product_of_experts(mu_e.unsqueeze(0), logvar_e.unsqueeze(0), self.with_prior(subsets))
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu  # (P, B, Z)
        p, b = subsets.shape[:2]
        recon = z.new_zeros(p, b)
        for i, (m, t) in enumerate(zip(self.modalities, targets)):
            logvar_obs = self.obs_logvar[m].clamp_min(math.log(MIN_OBS_VAR))
            sq = (self.decoders[m](z).float() - t.unsqueeze(0)) ** 2
            err = 0.5 * (sq * torch.exp(-logvar_obs) + logvar_obs + LOG_2PI).sum(dim=-1)  # (P, B)
            recon = recon + torch.where(subsets[..., i], err, torch.zeros_like(err))
        neg = recon + self.kl_weight * gaussian_kl_to_standard(mu, logvar)
        rows = subsets.any(dim=-1).to(neg.dtype)
        return (neg * rows).sum() / rows.sum().clamp_min(1.0) / sum(self.target_dims.values())

    def forward(self, batch: dict, full_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x, mask, y = batch["x"], batch["mask"], batch.get("y")
        avail = full_mask if full_mask is not None else mask
        # h_m of a present modality does not depend on which others are present: encode once with
        # every truly available modality and let the masks choose the experts
        hs = self.encode(x, avail)
        mu_e, logvar_e = self.expert_parameters(hs)
        mu_seen, _ = product_of_experts(mu_e, logvar_e, self.with_prior(mask))
        logits = self.head(mu_seen)
        out = {"logits": logits}
        if y is None:
            return out
        task = per_sample_loss(logits, y, self.task).mean()
        m = len(self.modalities)
        singles = torch.eye(m, dtype=torch.bool, device=mask.device).unsqueeze(1) & avail.unsqueeze(0)  # (M, B, M)
        subsets = torch.cat([avail.unsqueeze(0), mask.unsqueeze(0), singles, self._random_subsets(avail)])
        # targets of rows without the modality are never scored; zeroed so nothing non-finite reaches a gradient
        targets = [torch.where(avail[:, i:i + 1], reconstruction_target(self.encoders[name], x[name]), 0.0)
                   for i, name in enumerate(self.modalities)]
        elbo = self.negative_elbo(mu_e, logvar_e, subsets, targets)
        out["loss"] = task + self.lambda_elbo * elbo
        out["loss_task"] = task.detach()
        out["loss_elbo"] = elbo.detach()
        return out

    # ------------------------------------------------------------------ prediction
    def predict_logits(self, x, mask):
        mu, _ = self.posterior(x, mask)
        return self.head(mu)

    @torch.no_grad()
    def impute(self, x: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """{m: (B, n_m)} every modality decoded from the posterior mean given the present ones.

        For an absent modality this is its imputation; the space is the one the model
        reconstructs (``encoders.reconstruction_target``: standardised embedding, flattened sequence).
        """
        mu, _ = self.posterior(x, mask)
        return {m: self.decoders[m](mu) for m in self.modalities}

    @torch.no_grad()
    def predict_with_trace(self, x, mask):
        mu_e, logvar_e = self.expert_parameters(self.encode(x, mask))
        present = self.with_prior(mask)
        mu, _ = product_of_experts(mu_e, logvar_e, present)
        out = {"probabilities": probabilities(self.head(mu), self.task)}
        # label-free reliability: each present expert's share of the posterior precision (mean over z)
        precision = torch.where(present.unsqueeze(-1), torch.exp(-logvar_e), torch.zeros_like(logvar_e))
        share = (precision / precision.sum(dim=1, keepdim=True)).mean(dim=-1)  # (B, 1 + M)
        for i, m in enumerate(self.modalities):
            out[f"weight_{m}"] = share[:, i + 1]
            out[f"imputed_{m}"] = ~mask[:, i]  # the decoder reconstructs it from the present ones
        return out

    # ------------------------------------------------------------------ hooks
    def on_epoch_start(self, ctx) -> None:
        self.kl_weight = self._annealed(int(ctx.epoch))

    def extra_state(self) -> dict[str, Any]:
        return {"kl_weight": self.kl_weight}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "kl_weight" in state:
            self.kl_weight = float(state["kl_weight"])
