"""RankOneMemory: MoRAM's rank-1 associative memory (moram_bench/memory.py).

The fast path is checked against ``reference_forward`` (the straightforward formula) and
the reference itself against a formula written out by hand in plain Python.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moram_bench.memory import RankOneMemory, _gather_dot_chunked, gather_dot


def grown(d_in, d_out, grows, seed=0, value_std=1.0, **kw) -> RankOneMemory:
    """A memory after ``grows`` (list of r, or "freeze"), with non-zero values."""
    torch.manual_seed(seed)
    m = RankOneMemory(d_in, d_out, **kw)
    for g in grows:
        if g == "freeze":
            m.freeze()
            continue
        m.grow(g)
        with torch.no_grad():
            m.values.normal_(0.0, value_std)
            m.keys.add_(0.3 * torch.randn_like(m.keys))
    return m


def run_with_grads(fn, m, x, y0, gy):
    """Output and gradients of x, y0 and the current atoms for ``fn(x, y0)``."""
    xg = x.clone().requires_grad_(True)
    yg = y0.clone().requires_grad_(True)
    params = [p for p in (m.keys, m.values) if p is not None]
    out = fn(xg, yg)
    grads = torch.autograd.grad(out, [xg, yg, *params], gy)
    return out.detach(), grads


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    scale = b.abs().max().clamp_min(1.0)
    assert (a - b).abs().max() <= atol + rtol * scale, (a - b).abs().max()


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("kw, name", [
    (dict(topk=0), "topk"), (dict(tau=0.0), "tau"), (dict(tau=-1.0), "tau"),
    (dict(dropout=1.0), "dropout"), (dict(eps=0.0), "eps"),
])
def test_constructor_validates_arguments(kw, name):
    with pytest.raises(ValueError, match=name):
        RankOneMemory(4, 3, **kw)


@pytest.mark.parametrize("r", [0, -2, 1.5])
def test_grow_validates_r(r):
    with pytest.raises(ValueError, match="r must"):
        RankOneMemory(4, 3).grow(r)


# ------------------------------------------------------------------------ growth/freeze


def test_empty_memory_returns_y0_itself():
    m = RankOneMemory(4, 3)
    x, y0 = torch.randn(2, 5, 4), torch.randn(2, 5, 3)
    assert m(x, y0) is y0
    assert m.n_atoms == 0 and m.n_frozen == 0 and m.n_current == 0
    assert list(m.parameters()) == []


def test_grow_initialises_like_the_method():
    d_in, d_out, r = 10, 7, 3
    torch.manual_seed(5)
    expected = torch.empty(r, d_in)
    nn.init.kaiming_uniform_(expected, a=math.sqrt(5))
    torch.manual_seed(5)
    m = RankOneMemory(d_in, d_out)
    m.grow(r)
    assert torch.equal(m.keys, expected)
    assert m.keys.abs().max() <= 1 / math.sqrt(d_in)       # kaiming bound with a = sqrt(5)
    assert torch.equal(m.values, torch.zeros(d_out, r))
    assert m.keys.requires_grad and m.values.requires_grad
    assert (m.n_atoms, m.n_frozen, m.n_current) == (3, 0, 3)


def test_grow_freezes_previous_atoms():
    m = grown(6, 5, [4, 3])
    assert (m.n_atoms, m.n_frozen, m.n_current) == (7, 4, 3)
    assert [tuple(p.shape) for p in m.parameters()] == [(3, 6), (5, 3)]
    m.freeze()
    assert (m.n_atoms, m.n_frozen, m.n_current) == (7, 7, 0)
    assert list(m.parameters()) == []
    m.freeze()  # no current atoms: nothing happens
    assert m.n_frozen == 7
    assert m.atom_task_ids.tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_frozen_atoms_get_no_gradient_but_x_does():
    m = grown(6, 5, [4, 4, "freeze"])
    m.train()
    x, y0, gy = torch.randn(7, 6), torch.randn(7, 5), torch.randn(7, 5)
    out, grads = run_with_grads(m, m, x, y0, gy)
    ref_out, ref_grads = run_with_grads(m.reference_forward, m, x, y0, gy)
    assert_close(out, ref_out)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b)


@pytest.mark.parametrize("fold", [True, False])
def test_scale_when_freezing(fold):
    """Current atoms use s = scale; frozen atoms s = 1 with the scale folded into the
    values (default) or not (the official LLM code: the old atoms' effect is halved)."""
    m = grown(8, 6, [5], scale=2.0, fold_scale=fold)
    m.train()
    x, y0 = torch.randn(11, 8), torch.randn(11, 6)
    with torch.no_grad():
        before = m(x, y0) - y0
        m.freeze()
        after = m(x, y0) - y0
    assert torch.allclose(after, before if fold else before / 2, atol=1e-6)


def test_capacity_doubles_instead_of_copying_every_grow():
    m = RankOneMemory(4, 3)
    ptrs = set()
    for _ in range(40):
        m.grow(16)
        ptrs.add(m._key_store.data_ptr())
        assert m.capacity >= m.n_atoms
    assert m.capacity < 2 * m.n_atoms + 16
    assert len(ptrs) <= 7  # 640 rows reached by doubling: a handful of reallocations


# ----------------------------------------------------------------------- the formula


def hand_formula(keys, values, x, topk, tau, delta, scales, eps=1e-12):
    """docs/METHODS.md's MoRAM formula for one token, in plain Python floats."""
    p = [sum(a_j * x_j for a_j, x_j in zip(a, x)) for a in keys]
    norm = max(math.sqrt(sum(v * v for v in p)), eps)
    z = [v / norm for v in p]
    k = min(max(topk, 2), len(p))
    top = sorted(range(len(p)), key=lambda i: -z[i])[:k]
    mx = max(z[i] for i in top)
    e = {i: math.exp((z[i] - mx) / tau) for i in top}
    w = [e[i] / sum(e.values()) if i in e else 0.0 for i in range(len(p))]
    if delta is not None:
        w = [wi if zi >= delta else 0.0 for wi, zi in zip(w, z)]
    d_out = len(values[0])
    return [sum(w[i] * p[i] * scales[i] * values[i][o] for i in range(len(p))) for o in range(d_out)]


def test_hand_computed_example():
    """Three atoms, x = (3, 4): p = (3, 4, 7), z = p / sqrt(74), top-2 = atoms 3 and 2."""
    m = RankOneMemory(2, 2, topk=1, tau=0.1, delta=0.5)   # topk=1 -> k = 2
    m.grow(3)
    with torch.no_grad():
        m.keys.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        m.values.copy_(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.25]]))  # (d_out, r)
    x, y0 = torch.tensor([[3.0, 4.0]]), torch.tensor([[10.0, 20.0]])
    z2, z3 = 4 / math.sqrt(74), 7 / math.sqrt(74)
    w3 = 1 / (1 + math.exp((z2 - z3) / 0.1))
    w2 = 1 - w3
    m.train()  # no gate
    expected = [10 + w2 * 4 * 2.0 + w3 * 7 * 3.0, 20 + w2 * 4 * 0.5 + w3 * 7 * 0.25]
    assert torch.allclose(m(x, y0), torch.tensor([expected]), rtol=1e-6)
    m.eval()   # z2 = 0.465 < delta: atom 2 gated out, no renormalisation
    expected = [10 + w3 * 7 * 3.0, 20 + w3 * 7 * 0.25]
    assert torch.allclose(m(x, y0), torch.tensor([expected]), rtol=1e-6)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("grows, topk", [([3], 16), ([4, 4, 4], 3), ([8] * 6, 4)])
def test_reference_matches_hand_formula(grows, topk, train):
    m = grown(5, 3, grows, topk=topk, tau=0.05, delta=0.1, scale=1.5).double()
    m.train(train)
    x, y0 = torch.randn(4, 5, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64)
    nf = m.n_frozen     # frozen atoms: values stored with the scale folded in
    keys = m._key_store[:nf].tolist() + m.keys.tolist()
    values = m._val_store[:nf].tolist() + m.values.t().tolist()
    scales = [1.0] * m.n_frozen + [1.5] * m.n_current
    for t in range(4):
        want = hand_formula(keys, values, x[t].tolist(), topk, 0.05, None if train else 0.1, scales)
        with torch.no_grad():
            got = m.reference_forward(x[t:t + 1], y0[t:t + 1])[0]
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------- fast path == reference


CASES = [
    # d_in, d_out, grows, topk       (N vs k vs d_in exercise the dense/sparse/Gram paths)
    (8, 6, [3], 16),                 # k >= N
    (12, 10, [4, 4, 4], 1),          # topk=1 -> k=2
    (16, 9, [8] * 5, 4),             # N > d_in: Gram matrix in the backward
    (24, 20, [16] * 4, 4),           # sparse value products (N > 4k)
    (32, 16, [16] * 12, 8),          # larger N, sparse + Gram
    (6, 5, [4, 4, "freeze"], 3),     # only frozen atoms
]


@pytest.mark.parametrize("d_in, d_out, grows, topk", CASES)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_forward_and_gradients_match_reference(d_in, d_out, grows, topk, mode):
    m = grown(d_in, d_out, grows, topk=topk, delta=0.15, scale=2.0)
    m.train(mode == "train")
    x, y0 = torch.randn(3, 7, d_in), torch.randn(3, 7, d_out)
    gy = torch.randn(3, 7, d_out)
    with torch.no_grad():
        assert_close(m(x, y0), m.reference_forward(x, y0))
    out, grads = run_with_grads(m, m, x, y0, gy)
    ref_out, ref_grads = run_with_grads(m.reference_forward, m, x, y0, gy)
    assert out.shape == y0.shape
    assert_close(out, ref_out)
    assert len(grads) == len(ref_grads)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("grows, topk", [([8] * 6, 4), ([3, 3], 16)])   # k < N, k == N
@pytest.mark.parametrize("ratio", [0.0, 1e9])
@pytest.mark.parametrize("train", [False, True])
def test_dense_and_sparse_value_products_agree(ratio, grows, topk, train):
    m = grown(16, 12, grows, topk=topk, delta=0.1)
    m.dense_max_ratio = ratio
    m.train(train)
    x, y0, gy = torch.randn(13, 16), torch.randn(13, 12), torch.randn(13, 12)
    out, grads = run_with_grads(m, m, x, y0, gy)
    ref_out, ref_grads = run_with_grads(m.reference_forward, m, x, y0, gy)
    assert_close(out, ref_out)
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gradcheck_in_double_precision():
    # One thread: MKL threads even tiny float64 matmuls, which crawls on a loaded machine
    # (conftest restores the thread count).
    torch.set_num_threads(1)
    for grows in ([3, 3], [6] * 4):       # dense (P saved) and Gram backward paths
        m = grown(5, 4, grows, topk=3, tau=0.5).double()
        m.train()
        x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
        y0 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b, k, v: m(a, b), (x, y0, m.keys, m.values))


def test_large_memory_matches_reference():
    m = grown(64, 48, [16] * 20, topk=16, value_std=0.1)   # N = 320 > d_in
    x, y0, gy = torch.randn(2, 30, 64), torch.randn(2, 30, 48), torch.randn(2, 30, 48)
    for mode in (False, True):
        m.train(mode)
        out, grads = run_with_grads(m, m, x, y0, gy)
        ref_out, ref_grads = run_with_grads(m.reference_forward, m, x, y0, gy)
        assert_close(out, ref_out)
        for a, b in zip(grads, ref_grads):
            assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_forward_concatenates_nothing(monkeypatch):
    m = grown(16, 12, [8] * 6, topk=4)
    x, y0 = torch.randn(5, 16), torch.randn(5, 12)
    want_eval = m.eval().reference_forward(x, y0)

    def no_cat(*args, **kwargs):
        raise AssertionError("torch.cat called in the forward")

    monkeypatch.setattr(torch, "cat", no_cat)
    with torch.no_grad():
        got = m(x, y0)
    m.train()
    m(x.requires_grad_(True), y0).sum().backward()
    monkeypatch.undo()
    assert_close(got, want_eval)


def test_optimizer_steps_reach_the_forward():
    """In-place parameter updates (what optimizers do) are seen by the next call."""
    m = grown(10, 8, [4, 4], topk=3)
    m.train()
    x, y0 = torch.randn(6, 10), torch.randn(6, 8)
    for _ in range(3):
        grads = torch.autograd.grad(m(x, y0).pow(2).sum(), [m.keys, m.values])
        with torch.no_grad():
            for p, g in zip((m.keys, m.values), grads):
                p.sub_(0.5 * g)
            assert_close(m(x, y0), m.reference_forward(x, y0))


@pytest.mark.parametrize("ratio", [0.0, 1e9])
def test_zero_shot_fallback_is_exact(ratio):
    m = grown(12, 9, [4] * 5, topk=3, delta=0.999)
    m.dense_max_ratio = ratio
    m.eval()
    x, y0 = torch.randn(20, 12), torch.randn(20, 9)
    with torch.no_grad():
        assert torch.equal(m(x, y0), y0)
    m.delta = 0.0   # gate off: the memory contributes
    with torch.no_grad():
        assert not torch.equal(m(x, y0), y0)


def test_gate_only_at_evaluation():
    m = grown(12, 9, [4] * 5, topk=3, delta=0.999)
    x, y0 = torch.randn(20, 12), torch.randn(20, 9)
    with torch.no_grad():
        m.train()
        assert not torch.equal(m(x, y0), y0)


def test_dropout_applies_to_the_key_input_in_training_only():
    m = grown(12, 9, [4] * 3, topk=3, dropout=0.5)
    x, y0 = torch.randn(20, 12), torch.randn(20, 9)
    m.eval()
    with torch.no_grad():
        assert_close(m(x, y0), m.reference_forward(x, y0))
        m.train()
        torch.manual_seed(1)
        a = m(x, y0)
        torch.manual_seed(1)
        b = m.reference_forward(x, y0)
        torch.manual_seed(1)
        drop = nn.functional.dropout(x, 0.5)
        m.dropout = nn.Identity()
        c = m(drop, y0)
    assert_close(a, b)
    assert_close(a, c)


def test_zero_input_tokens():
    """x = 0: p = 0, the norm is clamped to eps, every value coefficient is 0 -> y = y0."""
    m = grown(8, 6, [4, 4], topk=3)
    m.train()
    x = torch.zeros(4, 8)
    x[1] = torch.randn(8)
    y0, gy = torch.randn(4, 6), torch.randn(4, 6)
    out, grads = run_with_grads(m, m, x, y0, gy)
    ref_out, ref_grads = run_with_grads(m.reference_forward, m, x, y0, gy)
    assert torch.equal(out[[0, 2, 3]], y0[[0, 2, 3]])
    for a, b in zip(grads, ref_grads):
        assert torch.isfinite(a).all()
        assert_close(a, b)


def test_gather_dot_matches_explicit_gather():
    g, table = torch.randn(37, 11), torch.randn(50, 11)
    idx = torch.stack([torch.randperm(50)[:6] for _ in range(37)])
    want = (table[idx] * g[:, None, :]).sum(-1)
    assert torch.allclose(gather_dot(g, table, idx), want, atol=1e-5)
    assert torch.allclose(_gather_dot_chunked(g, table, idx, chunk=8), want, atol=1e-5)


# ------------------------------------------------------------------- dtypes / devices


def test_bfloat16_autocast_inputs():
    m = grown(16, 12, [8] * 4, topk=4, value_std=0.1)
    m.eval()
    x, y0 = torch.randn(2, 9, 16), torch.randn(2, 9, 12)
    with torch.no_grad():
        want = m(x.bfloat16().float(), y0.bfloat16().float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m(x.bfloat16(), y0.bfloat16())
    assert got.dtype == torch.bfloat16 and got.shape == y0.shape
    assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2)
    m.delta = 0.999
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        yb = y0.bfloat16()
        assert torch.equal(m(x.bfloat16(), yb), yb)
    m.train()
    xg = x.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(xg, y0.bfloat16()).float().sum().backward()
    assert xg.grad.dtype == torch.bfloat16 and m.keys.grad.dtype == torch.float32


def test_inference_mode():
    m = grown(8, 6, [4, 4], topk=3).eval()
    x, y0 = torch.randn(3, 8), torch.randn(3, 6)
    with torch.inference_mode():
        got = m(x, y0)
    with torch.no_grad():
        assert torch.equal(got, m(x, y0))


# ------------------------------------------------------------------------- state dict


def test_state_dict_round_trip(tmp_path):
    history = [4, 4, "freeze", 3, 2]
    m1 = grown(10, 8, history, topk=3)
    sd = m1.state_dict()
    assert set(sd) == {"keys", "values", "frozen_keys", "frozen_values"}
    assert sd["frozen_keys"].shape == (11, 10) and sd["frozen_values"].shape == (8, 11)
    assert sd["keys"].shape == (2, 10) and sd["values"].shape == (8, 2)
    path = tmp_path / "mem.pt"
    torch.save(sd, path)
    loaded = torch.load(path, weights_only=True)
    # exactly the atoms: no spare capacity rows are written
    assert loaded["frozen_keys"].untyped_storage().nbytes() == 11 * 10 * 4

    m2 = RankOneMemory(10, 8, topk=3)
    for g in history:
        m2.freeze() if g == "freeze" else m2.grow(g)
    m2.load_state_dict(loaded, strict=True)
    x, y0 = torch.randn(5, 10), torch.randn(5, 8)
    for mode in (False, True):
        m1.train(mode), m2.train(mode)
        with torch.no_grad():
            assert torch.equal(m1(x, y0), m2(x, y0))
    assert m2.atom_task_ids.tolist() == m1.atom_task_ids.tolist()


def test_state_dict_size_mismatch_is_an_error():
    m1 = grown(10, 8, [4, 4, 4], topk=3)
    m2 = RankOneMemory(10, 8, topk=3)
    m2.grow(4)
    m2.grow(4)
    with pytest.raises(RuntimeError, match="frozen_keys"):
        m2.load_state_dict(m1.state_dict(), strict=True)


def test_state_dict_inside_a_model():
    outer = nn.ModuleDict({"a": grown(6, 5, [3, 3])})
    sd = outer.state_dict()
    assert set(sd) == {"a.keys", "a.values", "a.frozen_keys", "a.frozen_values"}
    fresh = nn.ModuleDict({"a": RankOneMemory(6, 5)})
    fresh["a"].grow(3)
    fresh["a"].grow(3)
    fresh.load_state_dict(sd, strict=True)
    x, y0 = torch.randn(4, 6), torch.randn(4, 5)
    with torch.no_grad():
        assert torch.equal(fresh["a"].eval()(x, y0), outer["a"].eval()(x, y0))


# ------------------------------------------------------------------------ routing stats


def test_routing_statistics():
    m = grown(12, 9, [4, 4, 4], topk=3, delta=0.2)
    m.eval()
    x, y0 = torch.randn(40, 12), torch.randn(40, 9)
    assert "routing_mass" not in m.state_dict()
    with torch.no_grad():
        m(x, y0)                       # not recording
    assert m.routing_tokens.item() == 0
    m.record_routing = True
    with torch.no_grad():
        m(x, y0)
        m(x[:10], y0[:10])
    # expected mass: the dense, gated routing weights of the reference formula
    a = m._key_store[:12]
    p = x @ a.t()
    z = p / p.norm(dim=1, keepdim=True)
    zv, idx = z.topk(3, dim=1)
    w = torch.zeros_like(z).scatter(1, idx, torch.softmax(zv / m.tau, 1)) * (z >= 0.2)
    want = w.sum(0) + w[:10].sum(0)
    assert torch.allclose(m.routing_mass.float(), want, atol=1e-5)
    assert m.routing_tokens.item() == 50
    fallback = (w.sum(1) == 0)
    assert m.routing_fallback.item() == fallback.sum().item() + fallback[:10].sum().item()
    by_task = m.routing_mass_by_task()
    assert torch.allclose(by_task.float(), want.view(3, 4).sum(1), atol=1e-5)
    m.reset_routing()
    assert m.routing_mass.abs().sum() == 0 and m.routing_tokens.item() == 0
    m.grow(5)
    assert m.routing_mass.shape == (17,)


def test_restored_memory_trains_identically():
    """Gradients after a state-dict restore equal the original's bit for bit (the Gram
    matrix of the frozen keys is rebuilt from scratch, independent of history)."""
    history = [8, 8, 8, "freeze", 8]               # n_frozen = 24 > d_in = 12
    m1 = grown(12, 10, history, topk=4)
    m1.train()
    x, y0, gy = torch.randn(9, 12), torch.randn(9, 10), torch.randn(9, 10)
    _, g1 = run_with_grads(m1, m1, x, y0, gy)
    m2 = RankOneMemory(12, 10, topk=4)
    for g in history:
        m2.freeze() if g == "freeze" else m2.grow(g)
    m2.load_state_dict(m1.state_dict(), strict=True)
    m2.train()
    _, g2 = run_with_grads(m2, m2, x, y0, gy)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
