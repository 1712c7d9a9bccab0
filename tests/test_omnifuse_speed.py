"""OmniFuse's faster paths compute what the straightforward ones do (issue 14 item 3).

Each fast path is compared with a straightforward one on fixed data: batched, chunked TLA mining under
inference mode vs masking and encoding subset by subset; in-place activations in the residual
autoencoders vs out-of-place ones; the loop's gradient clipping vs ``torch.nn.utils.clip_grad_norm_``;
and whole training epochs (forward, backward, clipping, AdamW, mining) of the two.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from raypipe.fusion.base import ModalitySpec, nonempty_subsets
from raypipe.fusion.omnifuse import OmniFuse
from raypipe.train import loop
from raypipe.train.data import tensor_batches

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py

SPECS = [ModalitySpec("a", (6,)), ModalitySpec("b", (5,)), ModalitySpec("c", (4,)), ModalitySpec("d", (3,))]


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    x = {s.name: rng.normal(size=(n, *s.shape)).astype(np.float32) for s in SPECS}
    mask = rng.random((n, len(SPECS))) < 0.7
    mask[~mask.any(axis=1), 0] = True  # every sample has at least one modality
    y = rng.integers(0, 2, n).astype(float)
    return x, mask, y


def _model(**kw):
    torch.manual_seed(0)
    return OmniFuse(SPECS, "binary", 2, hidden_dim=8, depth=3, **kw)


def _out_of_place(model: nn.Module) -> nn.Module:
    for mod in model.modules():
        if isinstance(mod, (nn.ReLU, nn.LeakyReLU)):
            mod.inplace = False
    return model


def test_the_cascade_activations_are_in_place():
    model = _model()
    acts = [m for m in model.cra_forward.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU))]
    assert len(acts) == 3 * 4 and all(m.inplace for m in acts)


@pytest.mark.parametrize("absent_fill", ["mean", "zero_input"])
@pytest.mark.parametrize("chunk", [7, 2048])
def test_batched_mining_equals_subset_by_subset(absent_fill, chunk):
    model = _model(absent_fill=absent_fill)
    model.mining_chunk = chunk  # 7: many chunks, each cutting through subsets
    x, mask, y = _data()
    batches = list(tensor_batches(x, mask, y, "binary", 16))  # 3 batches, natural masks
    fast = model.subset_losses(batches)
    ref = model.subset_losses_reference(batches)
    assert set(fast) == set(ref) == set(nonempty_subsets(4))
    for s in ref:
        assert fast[s] == pytest.approx(ref[s], rel=1e-5), s
    # reference by hand for one subset: the mean CE over the rows that have a and c, masked to {a, c}
    rows = mask[:, 0] & mask[:, 2]
    model.eval()
    with torch.no_grad():
        sub = torch.zeros(int(rows.sum()), 4, dtype=torch.bool)
        sub[:, [0, 2]] = True
        lg = model.joint_logits({m: torch.as_tensor(v[rows]) for m, v in x.items()}, sub)
        manual = torch.nn.functional.cross_entropy(lg, torch.as_tensor(y[rows]).long()).item()
    assert fast[(0, 2)] == pytest.approx(manual, rel=1e-5)


def test_mining_leaves_the_model_in_training_mode_and_its_sums_all_reducible():
    model = _model()
    model.train()
    x, mask, y = _data()
    # two workers with different rows: worker A's all-reduce adds worker B's stacked sums and counts, so
    # A's result must be the losses over the union of both workers' rows (the reference path on all rows)
    n = len(y)
    half = n // 2
    part_a = list(tensor_batches({m: v[:half] for m, v in x.items()}, mask[:half], y[:half], "binary", 64))
    part_b = list(tensor_batches({m: v[half:] for m, v in x.items()}, mask[half:], y[half:], "binary", 64))
    from_b, seen = [], []

    def capture(t):  # worker B's side: record what it would contribute
        from_b.append(t.clone())
        return t

    def all_reduce(t):  # an in-place collective, as torch.distributed's is
        seen.append(t.is_inference())
        return t.add_(from_b[0])

    model.subset_losses(part_b, all_reduce=capture)
    alone = model.subset_losses(part_a)
    reduced = model.subset_losses(part_a, all_reduce=all_reduce)
    union = model.subset_losses_reference(list(tensor_batches(x, mask, y, "binary", 64)))
    assert model.training and seen == [False]
    assert all(reduced[s] == pytest.approx(union[s], rel=1e-5) for s in union)
    assert any(alone[s] != pytest.approx(union[s], rel=1e-3) for s in union)  # the premise: B's rows matter


def test_position_mask_equals_repeat_interleave():
    model = _model()
    mask = torch.tensor(_data(10)[1])
    expect = mask.repeat_interleave(8, dim=1).to(torch.float32)
    assert torch.equal(model._position_mask(mask), expect)


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_clip_gradients_equals_torch(scale):
    torch.manual_seed(1)
    ps = [nn.Parameter(torch.randn(7, 5)) for _ in range(4)] + [nn.Parameter(torch.randn(3))]
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    for p, q in zip(ps, qs):
        g = torch.randn_like(p) * scale
        p.grad, q.grad = g.clone(), g.clone()
    qs[-1].grad = None  # a parameter without a gradient is skipped by both
    ps[-1].grad = None
    expect = torch.nn.utils.clip_grad_norm_(ps, 5.0, foreach=True)
    got = loop.clip_gradients(qs, 5.0)
    assert torch.equal(got, expect)
    for p, q in zip(ps[:-1], qs[:-1]):
        assert torch.equal(p.grad, q.grad)
    if scale > 1:  # the clipped case really clipped
        assert torch.linalg.vector_norm(torch.cat([q.grad.flatten() for q in qs[:-1]])) == pytest.approx(5.0, rel=1e-4)


def test_one_step_loss_and_gradients_equal_the_out_of_place_path():
    fast, ref = _model(), _out_of_place(_model())
    fast.lazy_subset = ref.lazy_subset = (1, 2)
    x, full, y = _data(24)
    seen = full.copy()
    seen[::3, 0] = False
    seen[~seen.any(axis=1), 1] = True
    batch = {"x": {m: torch.as_tensor(v) for m, v in x.items()}, "mask": torch.as_tensor(seen),
             "y": torch.as_tensor(y)}
    outs = []
    for model in (fast, ref):
        torch.manual_seed(3)  # the same dropout draws
        out = model(batch, full_mask=torch.as_tensor(full))
        out["loss"].backward()
        outs.append(out)
    assert torch.allclose(outs[0]["loss"], outs[1]["loss"], rtol=1e-6, atol=0)
    for k in ("loss_imp_forward", "loss_imp_backward", "loss_dwfuse", "loss_tla"):
        assert torch.allclose(outs[0][k], outs[1][k], rtol=1e-6, atol=0), k
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name


def test_training_epochs_equal_the_straightforward_path(monkeypatch):
    """Three epochs of the loop (simulation, forward, backward, clipping, fused AdamW, mining after each
    epoch): the fast path and the straightforward one (out-of-place activations, subset-by-subset mining,
    torch's clip_grad_norm_) end with the same weights, lazy subsets and d_S trace."""
    x, mask, y = _data(48)
    results = []
    for straightforward in (False, True):
        model = _model()
        if straightforward:
            _out_of_place(model)
            model.subset_losses = lambda batches, all_reduce=None, m=model: m.subset_losses_reference(batches)
            monkeypatch.setattr(loop, "clip_gradients",
                                lambda ps, mx: torch.nn.utils.clip_grad_norm_(ps, mx, foreach=True))
        opt = loop.make_optimizer(model, 1e-3, 1e-4)
        ctx = loop.HookContext(p_drop=0.5, seed=0, train_batches=lambda: tensor_batches(x, mask, y, "binary", 512))
        torch.manual_seed(5)
        traces = [loop.train_epoch(model, tensor_batches(x, mask, y, "binary", 16, shuffle=True, seed=e), opt, ctx, e,
                                   precision="fp32")
                  for e in range(3)]
        results.append((model, traces))
    (fast, t_fast), (ref, t_ref) = results
    for a, b in zip(t_fast, t_ref):
        assert a["tla"]["lazy"] == b["tla"]["lazy"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        for s in a["tla"]["d"]:
            assert a["tla"]["d"][s] == pytest.approx(b["tla"]["d"][s], rel=1e-4)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name
