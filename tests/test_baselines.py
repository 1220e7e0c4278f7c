"""Mechanics of the baselines (moe-lora, l2p, inflora, seq-lora) and their shared layers."""
import csv
import json
import math

import pytest
import torch
from torch import nn

from moram_bench import registry
from moram_bench.adapters.covariance import InputCovariance, free_directions, gpm_update
from moram_bench.adapters.moe import MoELoRA, top_k_softmax
from moram_bench.adapters.prompts import PromptPool, encode_hf_text_with_prompts
from moram_bench.config import resolve_config


# ------------------------------------------------------------------------------------ helpers
def build(method: str, *overrides: str, backbone=None):
    """A method on synthetic-tiny (tiny-clip unless ``backbone`` is given)."""
    cfg = resolve_config(["stream=synthetic-tiny", f"method={method}", "seed=0", *overrides])
    stream = registry.STREAMS[cfg.stream.name](cfg)
    bb = backbone if backbone is not None else registry.BACKBONES[cfg.backbone.name](cfg)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny models: threads only spin (conftest restores the setting)
    return registry.METHODS[method](cfg, stream, bb)


def data(module):
    """The stream's DataModule, as the runner passes it to the lifecycle hooks."""
    from moram_bench.data import TaskStreamDataModule

    return TaskStreamDataModule(module.stream, 8, [2] * len(module.stream), 0, transform=module.backbone.preprocess)


def begin(module, task):
    module.meta_begin_task(task, data(module))


def end(module, task):
    module.meta_end_task(task, data(module))


def image_batch(module, n=6, task=0):
    ds = data(module).dataset("test", task)
    items = [ds[i] for i in range(n)]
    return {"x": torch.stack([it["x"] for it in items]), "label": torch.tensor([it["label"] for it in items])}


def perturb_trainable(module, seed):
    """Stand-in for training: random values in every trainable parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@torch.no_grad()
def eval_logits(module, batch, task=0):
    module.eval()
    module.protocol.on_eval_start()
    out = module.protocol.logits(batch, task)
    module.protocol.on_eval_end()
    return out


# ------------------------------------------------------------------------------------ MoE-LoRA
def test_top_k_softmax_is_exact():
    scores = torch.randn(5, 7)
    w, idx = top_k_softmax(scores, 3)
    assert ((w > 0).sum(-1) == 3).all()
    top = scores.topk(3, dim=-1)
    assert torch.equal(idx, top.indices)
    assert torch.allclose(w.gather(1, top.indices), torch.softmax(top.values, -1))
    assert torch.allclose(w.sum(-1), torch.ones(5))
    # k larger than the number of experts: plain softmax over all
    w_all, _ = top_k_softmax(scores[:, :2], 3)
    assert torch.allclose(w_all, torch.softmax(scores[:, :2], -1))


def test_moe_layer_matches_the_formula_and_old_experts_get_no_gradient():
    torch.manual_seed(0)
    layer = MoELoRA(8, 6, r=2, top_k=2)
    for _ in range(3):
        layer.grow()
        with torch.no_grad():  # stand-in for training the new expert and its router row
            layer.B[-1].normal_()
            layer.router[-1].normal_()
    assert layer.n_experts == 3
    x = torch.randn(4, 5, 8)
    y0 = torch.randn(4, 5, 6)
    y = layer(x, y0)
    # the formula, token by token
    w, _ = top_k_softmax(x @ layer.router_weight().t(), 2)
    ref = y0 + sum(w[..., e:e + 1] * (x @ layer.A[e].t() @ layer.B[e].t()) for e in range(3))
    assert torch.allclose(y, ref, atol=1e-5)
    assert ((w > 0).sum(-1) == 2).all()
    y.square().sum().backward()
    for e in (0, 1):
        assert layer.A[e].grad is None and layer.B[e].grad is None and layer.router[e].grad is None
    assert layer.A[2].grad.abs().sum() > 0 and layer.B[2].grad.abs().sum() > 0
    assert layer.router[2].grad is not None


def test_moe_per_sample_routing_uses_one_decision_per_sample():
    torch.manual_seed(0)
    layer = MoELoRA(8, 6, r=2, top_k=2, per_sample=True)
    for _ in range(4):
        layer.grow()
        with torch.no_grad():
            layer.router[-1].normal_()
    x = torch.randn(3, 5, 8)
    w, _ = layer.route(x)
    assert w.shape == (3, 1, 4)  # one routing decision per sample, broadcast over its tokens
    x2 = x.clone()
    x2[:, 1:] = torch.randn(3, 4, 8)  # other tokens do not matter
    assert torch.equal(layer.route(x2)[0], w)
    assert not torch.equal(layer.route(torch.randn(3, 5, 8))[0], w)
    # the routing statistics count every token's weight (one unit per token)
    layer.record_routing = True
    layer(x, torch.zeros(3, 5, 6))
    assert int(layer.routing_tokens) == 15
    assert layer.routing_mass.sum().item() == pytest.approx(15.0)
    token_w = MoELoRA(8, 6, r=2, top_k=2)
    token_w.router = layer.router
    assert token_w.route(x)[0].shape == (3, 5, 4)


def test_moe_lora_method_adds_an_expert_per_task_and_trains_only_the_new_one():
    m = build("moe-lora", "method.r=2", "method.balance_loss=true")
    layers = list(m.adapters().values())
    assert len(layers) == 24  # MoRAM's placement on tiny-clip: 6 linears x 2 blocks x 2 towers
    for t in range(2):
        begin(m, t)
        assert all(layer.n_experts == t + 1 for layer in layers)
        trainable = {id(p) for p in m.trainable_parameters()}
        expected = {id(p) for layer in layers for p in (layer.A[t], layer.B[t], layer.router[t])}
        assert trainable == expected
        perturb_trainable(m, t)
        m.train()
        batch = image_batch(m, task=t)
        loss, out = m.protocol_loss(batch, t)
        extra = m.extra_loss(batch, out)
        assert extra is not None and extra.item() >= 0  # the load-balancing term, when switched on
        (loss + extra).backward()
        assert all(layer.A[t].grad is not None for layer in layers)
        if t:
            assert all(layer.A[0].grad is None and layer.router[0].grad is None for layer in layers)
        m.zero_grad(set_to_none=True)
        end(m, t)
    assert m.count_trainable() == 0
    assert m.extra_metrics()["experts_per_layer"] == 2


# ------------------------------------------------------------------------------------ L2P
def test_prompt_pool_selects_per_sample_and_batch_voting_shares_one_selection():
    pool = PromptPool(size=6, length=2, dim=4, key_dim=6)
    with torch.no_grad():
        pool.keys.copy_(torch.eye(6))
    q = torch.tensor([[1.0, 0.9, 0.0, 0, 0, 0], [0, 0, 0, 0, 0.9, 1.0], [0, 0, 0, 0.1, 1.0, 0.8]])
    sel = pool.select(q, 2)
    assert sel.idx.tolist() == [[0, 1], [4, 5], [4, 5]]  # ascending pool index within a sample
    assert torch.allclose(sel.sim, pool.similarity(q).gather(1, sel.idx))
    assert pool.tokens(sel.idx).shape == (3, 4, 4)
    voted = pool.select(q, 2, batch_voting=True)
    assert voted.idx.tolist() == [[4, 5]] * 3  # the two prompts chosen most often in the batch


def test_l2p_selects_per_sample_and_the_pull_term_moves_keys_toward_queries():
    m = build("l2p", "method.train_batch_voting=false")  # per-sample selection in training too
    assert m.placement == "image"
    assert m.count_trainable() == m.pool.prompts.numel() + m.pool.keys.numel()  # only prompts and keys
    begin(m, 0)
    batch = image_batch(m)
    # two samples with different queries select different prompts
    with torch.no_grad():
        q = torch.nn.functional.normalize(m.query(batch), dim=-1)
        m.pool.keys[:5] = q[0] + 0.01 * torch.randn(5, q.shape[1])
        m.pool.keys[5:] = q[1] + 0.01 * torch.randn(5, q.shape[1])
    sel = m.select(batch)
    assert sel.idx[0].tolist() == [0, 1, 2, 3, 4] and sel.idx[1].tolist() == [5, 6, 7, 8, 9]
    # one optimisation step on the pull term alone raises the selected keys' cosine
    with torch.no_grad():
        m.pool.keys.uniform_(-1, 1)
    sel = m.select(batch)
    m.train()
    loss, out = m.protocol.loss(batch, 0)
    before = out["prompt_sim"].detach().mean()
    opt = torch.optim.SGD([m.pool.keys], lr=10.0)
    m.extra_loss(batch, out).backward()
    assert m.pool.prompts.grad is None  # the pull term trains the keys only
    opt.step()
    after = m.pool.similarity(q).gather(1, sel.idx).mean()
    assert after > before + 1e-3
    # the prompts do change the prompted image embedding (the hook is active in loss/logits)
    m.zero_grad(set_to_none=True)
    loss.backward()
    assert m.pool.prompts.grad.abs().sum() > 0
    assert m.extra_metrics()["batch_voting"] is False


def _tiny_hf_text_backbone(embed=16):
    """A ClipBackbone with a CNN image trunk and a tiny random BERT text tower (as mini-clip)."""
    from open_clip.hf_model import HFTextEncoder
    from transformers import BertConfig

    from moram_bench.backbones.clip import ClipBackbone

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, pad_token_id=0,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = nn.Module()
    model.text = HFTextEncoder("tiny-bert", embed, config=cfg, pooler_type="mean_pooler", proj_type="linear")
    model.visual = nn.Module()
    model.visual.trunk = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.visual.head = nn.Linear(8, embed)
    model.logit_scale = nn.Parameter(torch.tensor(2.0))
    model.encode_text = model.text
    model.eval()

    def tokenizer(texts):
        out = torch.zeros(len(texts), 12, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [1] + [3 + sum(map(ord, w)) % 47 for w in t.split()][:10] + [2]
            out[i, :len(ids)] = torch.tensor(ids)
        return out

    return ClipBackbone(model, tokenizer, lambda im: torch.zeros(3, 32, 32), model.visual.trunk, model.visual.head,
                        "tiny-hf-clip", {"image_size": 32, "adapter_targets": [r"text\.proj$"]}, pad_id=0)


def test_hf_text_prompts_are_inserted_after_cls_and_padding_stays_masked():
    text = _tiny_hf_text_backbone().model.text
    tokens = torch.tensor([[1, 5, 6, 7, 2, 0, 0], [1, 8, 9, 2, 0, 0, 0]])
    no_prompt = torch.zeros(2, 0, 16)
    with torch.no_grad():
        assert torch.allclose(encode_hf_text_with_prompts(text, tokens, no_prompt), text(tokens), atol=1e-6)
        p = torch.randn(2, 3, 16)
        full = encode_hf_text_with_prompts(text, tokens, p)
        trimmed = encode_hf_text_with_prompts(text, tokens[:, :5], p)
        assert torch.allclose(full, trimmed, atol=1e-5)  # padding never attends nor is pooled
        assert not torch.allclose(full, text(tokens), atol=1e-3)


def test_l2p_text_placement_scores_each_image_with_its_own_prompts():
    m = build("l2p", "method.text_chunk=7", "method.train_batch_voting=false", backbone=_tiny_hf_text_backbone())
    assert m.placement == "text" and m.pool.dim == 16 and m.pool.key_dim == 8
    begin(m, 0)
    batch = {"x": torch.randn(5, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0, 1])}
    with torch.no_grad():
        m.pool.keys.normal_()
    sel = m.select(batch)
    logits = eval_logits(m, batch)
    # the grouped computation equals scoring every image against its own prompted classes
    bb = m.backbone
    tokens = bb.tokenize(m.stream.all_prompts())
    img = m.protocol.encode_images(batch)
    with torch.no_grad():
        for b in range(5):
            prompts = m.pool.tokens(sel.idx[b:b + 1]).expand(len(tokens), -1, -1)
            txt = encode_hf_text_with_prompts(bb.model.text, tokens, prompts, cls_position=True)
            txt = torch.nn.functional.normalize(txt, dim=-1)
            assert torch.allclose(logits[b], txt @ img[b], atol=1e-5)
    m.train()
    loss, out = m.protocol.loss(batch, 0)
    assert out["logits"].shape == (5, 3) and torch.isfinite(loss)
    # the per-sample-logit loss is the CLIP protocol's loss (checked on un-prompted logits)
    m.prompting = False
    plain, plain_out = m.protocol.loss(batch, 0)
    seen = m.protocol.seen_classes(0)  # the text side's official divisor: the classes seen so far
    assert torch.allclose(m.protocol.clip_loss_from_logits(plain_out["logits"], batch["label"], seen), plain)


# ------------------------------------------------------------------------------------ InfLoRA
def _known_spectrum(d=12, eig=(10.0, 5.0, 2.0, 1.0, 0.5), seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    e = torch.zeros(d, dtype=torch.float64)
    e[:len(eig)] = torch.tensor(eig, dtype=torch.float64)
    return q, (q * e) @ q.t()


def test_gpm_basis_grows_as_the_energy_threshold_says():
    q, cov = _known_spectrum()
    # energies (squared eigenvalues) 100, 25, 4, 1, 0.25 of 130.25 in total
    assert gpm_update(None, cov, 0.75).shape[1] == 1        # 100 / 130.25 = 0.768
    m = gpm_update(None, cov, 0.95)
    assert m.shape[1] == 2                                   # 125 / 130.25 = 0.960
    proj = m @ m.t()
    assert torch.allclose(proj, q[:, :2] @ q[:, :2].t(), atol=1e-8)
    assert gpm_update(m, cov, 0.95).shape[1] == 2            # already captured: nothing added
    m3 = gpm_update(m, cov, 0.99)                            # 129 / 130.25 = 0.990: one more
    assert m3.shape[1] == 3 and torch.equal(m3[:, :2], m)
    assert torch.allclose(m3.t() @ m3, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(m3 @ m3.t(), q[:, :3] @ q[:, :3].t(), atol=1e-8)
    assert gpm_update(m3, cov, 1.0).shape[1] == 5            # never adds zero-energy directions
    # the designed directions avoid the memory: the next eigenvectors, orthogonal to M
    d = free_directions(m, cov, 2)
    assert (m.t() @ d).abs().max() < 1e-10
    assert torch.allclose((d @ d.t()), q[:, 2:4] @ q[:, 2:4].t(), atol=1e-8)


def test_input_covariance_hooks_average_x_xT_over_tokens():
    lin = nn.Linear(3, 2)
    cov = InputCovariance({"l": lin})
    x = torch.randn(4, 5, 3)
    with cov, torch.no_grad():
        lin(x[:2])
        lin(x[2:])
    lin(x)  # outside the block: not counted
    cov.all_reduce(lambda t: t)
    flat = x.reshape(-1, 3)
    assert torch.allclose(cov.covariances()["l"], flat.t() @ flat / 20, atol=1e-6)


def test_inflora_designs_orthogonal_down_projections_and_trains_only_up():
    m = build("inflora")
    layers = m.adapters()
    assert len(layers) == 8 and all(n.endswith(("k_proj", "v_proj")) for n in layers)
    assert [m.threshold(t) for t in range(3)] == pytest.approx([0.95, 0.95 + 0.05 / 3, 0.95 + 0.1 / 3])
    begin(m, 0)
    perturb_trainable(m, 0)
    end(m, 0)
    bases = {n: layer.basis.clone() for n, layer in layers.items()}
    assert all(0 < b.shape[1] < b.shape[0] for b in bases.values())
    begin(m, 1)
    for n, layer in layers.items():
        r = layer.r
        d1 = layer.down[r:2 * r]
        assert (bases[n].t() @ d1.t()).abs().max() < 1e-5
        assert d1.norm(dim=1).max() == pytest.approx(1 / math.sqrt(3), rel=1e-4)
    assert {id(p) for p in m.trainable_parameters()} == {id(layer.up[1]) for layer in layers.values()}
    m.train()
    batch = image_batch(m, task=1)
    loss, _ = m.protocol.loss(batch, 1)
    loss.backward()
    assert all(layer.up[1].grad is not None and layer.up[0].grad is None for layer in layers.values())
    m.zero_grad(set_to_none=True)
    end(m, 1)
    for n, layer in layers.items():  # the basis only grows, keeping its earlier columns
        assert layer.basis.shape[1] >= bases[n].shape[1]
        assert torch.allclose(layer.basis[:, :bases[n].shape[1]], bases[n])


# ------------------------------------------------------------------------------------ seq-lora
def test_seq_lora_single_adapter_is_shared_across_tasks():
    m = build("seq-lora", "method.r=2")
    begin(m, 0)
    first = [p for p in m.trainable_parameters()]
    end(m, 0)
    begin(m, 1)
    second = [p for p in m.trainable_parameters()]
    assert len(first) == len(second) == 48 and all(a is b for a, b in zip(first, second))
    assert all(p.requires_grad for p in second)


# ------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("method", ["moe-lora", "l2p", "inflora"])
def test_grown_state_round_trip_gives_identical_outputs(method):
    a = build(method)
    for t in range(2):
        begin(a, t)
        perturb_trainable(a, 10 + t)
        end(a, t)
    state = a.grown_state()
    b = build(method)
    for t in range(2):
        b.meta_begin_task(t, None, restoring=True)
        b.meta_end_task(t, None, restoring=True)
    b.load_grown_state(state)
    batch = image_batch(a)
    out_a, out_b = eval_logits(a, batch), eval_logits(b, batch)
    assert torch.equal(out_a, out_b)
    assert not torch.allclose(out_a, eval_logits(build(method), batch))  # the state mattered


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("method", ["moe-lora", "l2p", "inflora"])
def test_fit_end_to_end_writes_the_matrix(tiny_overrides, tmp_path, method):
    from moram_bench.__main__ import main

    out = tmp_path / "run"
    assert main(["fit", *tiny_overrides(out, f"method={method}", "stream.iterations=2", "stream.test_per_class=3",
                                        "stream.shots=4", "trainer.num_threads=1")]) == 0
    with open(out / "matrix.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["after_task", "task1", "task2", "task3"] and len(rows) == 5
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["method_settings"]
    if method == "l2p":
        assert metrics["method_settings"]["batch_voting"] is False


# ------------------------------------------------------------------------------------ fidelity switches
def test_l2p_pull_term_is_the_official_sum_of_selected_cosines_batch_averaged():
    """Official l2p-pytorch: reduce_sim = sum over the batch and the top-N selected keys of
    cos(query, key), divided by the batch size; loss -= coeff * reduce_sim (coeff 0.1)."""
    m = build("l2p")
    begin(m, 0)
    batch = image_batch(m)
    m.train()
    _, out = m.protocol_loss(batch, 0)
    with torch.no_grad():
        q = m.query(batch).double()
        k = m.pool.keys.double()
        qn = q / q.pow(2).sum(1, keepdim=True).clamp_min(1e-12).sqrt()
        kn = k / k.pow(2).sum(1, keepdim=True).clamp_min(1e-12).sqrt()
        idx = (qn @ kn.t()).topk(int(m.hp.top_n), dim=1).indices            # (B, N)
        reduce_sim = (kn[idx] * qn[:, None, :]).sum() / q.shape[0]
    assert m.hp.pull_sum_over_selected is True and m.hp.pull_lambda == 0.1  # the official defaults
    assert m.extra_loss(batch, out).item() == pytest.approx(-0.1 * reduce_sim.item(), rel=1e-5)
    # the switch: the mean over the N selected keys (N times weaker)
    m.hp.pull_sum_over_selected = False
    assert m.extra_loss(batch, out).item() == pytest.approx(-0.1 * reduce_sim.item() / int(m.hp.top_n), rel=1e-5)


@pytest.mark.parametrize("cls_position", [True, False])
def test_l2p_vit_prompts_enter_after_cls_with_the_cls_position_embedding(cls_position):
    """The transformer blocks receive [CLS, prompts, patches] after ln_pre, each prompt token
    with [CLS]'s position embedding added (official L2P) or none (switch)."""
    m = build("l2p", f"method.prompt_cls_position={str(cls_position).lower()}")
    visual = m.backbone.model.visual
    seen = []
    handle = visual.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    batch = image_batch(m, n=2)
    prompts = torch.randn(2, 3, m.vision_hook.width)
    try:
        with torch.no_grad():
            m.protocol.encode_images(batch)                      # un-prompted
            with m.vision_hook.prompts(prompts):
                m.protocol.encode_images(batch)                  # prompted
    finally:
        handle.remove()
    plain, prompted = seen[0], seen[1]
    if plain.shape[0] != 2:  # open_clip may run the blocks sequence-first
        plain, prompted = plain.transpose(0, 1), prompted.transpose(0, 1)
    pos0 = visual.positional_embedding[0] if cls_position else torch.zeros_like(visual.positional_embedding[0])
    with torch.no_grad():
        expected = visual.ln_pre(prompts + pos0)
    assert prompted.shape[1] == plain.shape[1] + 3
    assert torch.allclose(prompted[:, 1:4], expected, atol=1e-5)
    assert torch.allclose(prompted[:, :1], plain[:, :1], atol=1e-6)   # [CLS] and patches untouched
    assert torch.allclose(prompted[:, 4:], plain[:, 1:], atol=1e-6)


def test_l2p_text_prompts_take_the_cls_position_and_words_keep_theirs():
    text = _tiny_hf_text_backbone().model.text
    tokens = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 8, 9, 2, 0, 0]])
    seen = []
    emb = text.transformer.embeddings.position_embeddings
    handle = emb.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            encode_hf_text_with_prompts(text, tokens, torch.randn(2, 3, 16), cls_position=True)
            encode_hf_text_with_prompts(text, tokens, torch.randn(2, 3, 16), cls_position=False)
    finally:
        handle.remove()
    assert seen[0].tolist() == [[0, 0, 0, 0, 1, 2, 3, 4, 5]] * 2       # [CLS], 3 prompts at 0, words 1..
    assert seen[1].reshape(-1, 9)[0].tolist() == list(range(9))       # the switch: prompts at 1..3


def test_l2p_on_a_cnn_image_tower_is_named_as_the_text_prompt_variant():
    m = build("l2p", backbone=_tiny_hf_text_backbone())
    assert m.placement == "text" and m.extra_metrics()["display_name"] == "l2p (text prompts)"
    assert build("l2p").extra_metrics()["display_name"] == "l2p"


def _moram_layer_reference(mem, x, y0):
    """docs/METHODS.md's MoRAM read with every atom (frozen and current) listed explicitly."""
    keys = torch.cat([mem._key_store[:mem.n_frozen]] + ([mem.keys] if mem.keys is not None else []))
    vals = torch.cat([mem._val_store[:mem.n_frozen]] + ([(mem.values * mem.scale).t()] if mem.keys is not None else []))
    p = x @ keys.t()
    z = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = min(max(mem.topk, 2), keys.shape[0])
    top = z.topk(k, dim=-1)
    w = torch.zeros_like(z).scatter(-1, top.indices, torch.softmax(top.values / mem.tau, -1))
    if mem.delta > 0:
        w = w * (z >= mem.delta)
    return y0 + (w * p) @ vals


@pytest.mark.parametrize("keep", [True, False])
def test_moram_keep_null_atoms_puts_r_zero_value_atoms_in_every_evaluated_memory(keep):
    """Official TRACE code: the next task's r fresh atoms (kaiming keys, zero values) are in
    the memory whenever a row of the matrix is evaluated, and the next task trains them."""
    r, T = 2, 3
    m = build("moram", f"method.r={r}", f"method.keep_null_atoms={str(keep).lower()}")
    mems = list(m.adapters().values())
    pending = None
    for t in range(T):
        begin(m, t)
        assert all(mem.n_current == r and mem.n_atoms == r * (t + 1) for mem in mems)
        if pending is not None:  # the null atoms of the last evaluation are this task's atoms
            assert all(mem.keys is k for mem, k in zip(mems, pending))
        trained = [mem.keys for mem in mems]
        perturb_trainable(m, t)  # stand-in for training
        end(m, t)
        # what the evaluation of row t sees
        for mem, keys in zip(mems, trained):
            n_eval = r * (t + 1) + (r if keep else 0)
            assert mem.n_atoms == n_eval
            if keep:
                null_vals = mem.values.t() if mem.keys is not None else mem._val_store[n_eval - r:n_eval]
                assert torch.count_nonzero(null_vals) == 0 and null_vals.shape[0] == r
                assert torch.count_nonzero(mem._val_store[:r * (t + 1)]) > 0  # trained atoms are not null
        mem = mems[0]
        mem.eval()
        x, y0 = torch.randn(4, mem.d_in), torch.randn(4, mem.d_out)
        with torch.no_grad():
            assert torch.allclose(mem(x, y0), _moram_layer_reference(mem, x, y0), atol=1e-5)
        mem.train()
        pending = [mem.keys for mem in mems] if keep and t < T - 1 else None
    assert m.count_trainable() == 0  # after the last task every atom is frozen


def test_inflora_first_task_keeps_the_directions_strictly_below_the_threshold():
    """Official InfLoRA (update_DualGPM after the first task): r = #(cumulative energy ratio
    < threshold), at least 1; later tasks add the fewest directions that reach it."""
    import numpy as np

    _, cov = _known_spectrum()  # energies 100, 25, 4, 1, 0.25 of 130.25
    s = np.linalg.svd(cov.numpy(), compute_uv=False)
    ratio = np.cumsum(s ** 2) / (s ** 2).sum()
    for thr, official, reach in [(0.95, 1, 2), (0.99, 2, 3), (0.5, 1, 1), (1.0, 4, 5)]:
        assert max(1, int(np.sum(ratio < thr))) == official
        assert gpm_update(None, cov, thr, strict_first=True).shape[1] == official
        assert gpm_update(None, cov, thr).shape[1] == reach
    # later tasks (non-empty basis) are unaffected by the switch
    m1 = gpm_update(None, cov, 0.75)
    assert torch.equal(gpm_update(m1, cov, 0.99, strict_first=True), gpm_update(m1, cov, 0.99))


@pytest.mark.parametrize("rule", ["below", "reach"])
def test_inflora_method_applies_the_first_task_rule(rule):
    import numpy as np

    m = build("inflora", f"method.first_task_rule={rule}")
    begin(m, 0)
    covs = m.input_covariances(data(m), 0)  # the same covariances end_task recomputes
    end(m, 0)
    eps = m.threshold(0)
    for name, layer in m.adapters().items():
        s = np.linalg.svd(covs[name].double().numpy(), compute_uv=False)
        ratio = np.cumsum(s ** 2) / (s ** 2).sum()
        below = max(1, int(np.sum(ratio < eps)))
        expected = below if rule == "below" else gpm_update(None, covs[name], eps).shape[1]
        assert layer.basis.shape[1] == expected


@pytest.mark.parametrize("squared", [False, True])
def test_olora_loss_terms_match_the_official_trainer(squared):
    """Official O-LoRA trainer: lambda1 * sum_layers sum |A_prev A_new^T| + lambda2 *
    sum over the new A's and B's of torch.norm(param, p=2) (unsquared Frobenius norms)."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from baselines.olora import OLoRA, OLoRALayer

    torch.manual_seed(0)
    layers = {"l0": OLoRALayer(6, 5, 2, None, 0.0), "l1": OLoRALayer(4, 3, 2, None, 0.0)}
    for layer in layers.values():
        layer.grow()
        with torch.no_grad():
            layer.B.normal_()
        layer.grow()
        with torch.no_grad():
            layer.B.normal_()
    hp = OmegaConf.create({"lambda1": 0.5, "lambda2": 0.3, "lambda2_squared": squared})
    fake = SimpleNamespace(hp=hp, adapters=lambda: layers)
    got = OLoRA.extra_loss(fake, {}, {})
    orth = sum((layer.frozen_A @ layer.A.t()).abs().sum() for layer in layers.values())
    if squared:
        l2 = sum((layer.A ** 2).sum() + (layer.B ** 2).sum() for layer in layers.values())
    else:
        l2 = sum(torch.sqrt((layer.A ** 2).sum()) + torch.sqrt((layer.B ** 2).sum()) for layer in layers.values())
    assert got.item() == pytest.approx((0.5 * orth + 0.3 * l2).item(), rel=1e-6)


def test_l2p_text_placement_encodes_each_prompt_set_once_per_evaluation():
    """Evaluation reuses a prompt set's class embeddings across batches (the model is
    frozen), with the same logits as encoding them per batch."""
    m = build("l2p", backbone=_tiny_hf_text_backbone())
    begin(m, 0)
    with torch.no_grad():
        m.pool.keys.normal_()
    batch = {"x": torch.randn(6, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0, 1, 2])}
    calls = []
    encode = m.protocol.prompted_text
    m.protocol.prompted_text = lambda idx, tokens: calls.append(len(idx)) or encode(idx, tokens)
    m.eval()
    with torch.no_grad():
        m.protocol.on_eval_start()
        first = m.protocol.logits(batch, 0)
        again = m.protocol.logits(batch, 0)             # every set is cached: nothing encoded
        m.protocol.on_eval_end()
    n_sets = len(torch.unique(m.select(batch).idx, dim=0))
    assert calls == [n_sets] and torch.equal(first, again)
    assert torch.allclose(first, eval_logits(m, batch), atol=1e-6)  # a fresh evaluation agrees
    m.train()
    # training never uses the cache: each step encodes its own sets (and votes if asked)
    m.hp.train_batch_voting = True
    assert m.voting() is True
    m.eval()
    assert m.voting() is False  # test images keep their own selection
