"""moe-adapters (MoE-Adapters4CL): block-level injection, gating, activate-freeze, DDAS, resume."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from moram_bench import registry
from moram_bench.adapters.inject import AdaptedBlock, adapted_modules, inject_block_adapters
from moram_bench.config import resolve_config

from baselines.moe_adapters import DDAS, MoEAdapterLayer  # noqa: E402  (registered by discover())


# ------------------------------------------------------------------------------------ helpers
def build(*overrides: str, backbone=None):
    registry.discover()
    cfg = resolve_config(["stream=synthetic-tiny", "method=moe-adapters", "seed=0", *overrides])
    stream = registry.STREAMS[cfg.stream.name](cfg)
    bb = backbone if backbone is not None else registry.BACKBONES[cfg.backbone.name](cfg)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return registry.METHODS["moe-adapters"](cfg, stream, bb)


def data(module):
    from moram_bench.data import TaskStreamDataModule

    return TaskStreamDataModule(module.stream, 8, [2] * len(module.stream), 0, transform=module.backbone.preprocess)


def image_batch(module, n=6, task=0):
    ds = data(module).dataset("test", task)
    items = [ds[i] for i in range(n)]
    return {"x": torch.stack([it["x"] for it in items]), "label": torch.tensor([it["label"] for it in items])}


def perturb_experts(module, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.moe_layers():
            for p in list(layer.experts.parameters()) + list(layer.gate):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


# ------------------------------------------------------------------------------------ injection
class Scaled(nn.Module):
    """A stand-in adapter: 2 * u (easy to compute by hand)."""

    def forward(self, u):
        return 2.0 * u


def test_adapted_block_adds_beside_the_mlp_of_an_open_clip_block():
    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ResidualAttentionBlock(8, 2).eval()
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        u = x + block.attention(block.ln_1(x))
        expected = u + block.mlp(block.ln_2(u)) + 2.0 * u
        root = nn.Sequential(block)
        wrapped = inject_block_adapters(root, [{"pattern": r"^0$", "read": "ln_2", "write": "ls_2"}],
                                        lambda name, b, width: Scaled())
        assert list(wrapped) == ["0"] and isinstance(root[0], AdaptedBlock)
        assert torch.allclose(root(x), expected, atol=1e-6)
    assert not any(p.requires_grad for p in root.parameters())


def test_adapted_block_on_a_post_ln_bert_layer():
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=8, num_attention_heads=2, intermediate_size=16, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    layer = BertLayer(cfg).eval()
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        u = layer.attention(x)[0]
        expected = layer.output.LayerNorm(layer.output.dense(layer.intermediate(u)) + 2.0 * u + u)
        holder = nn.ModuleDict({"layer": layer})
        widths = []
        inject_block_adapters(holder, [{"pattern": r"^layer$", "read": "intermediate", "write": "output.dense"}],
                              lambda name, b, width: widths.append(width) or Scaled())
        out = holder["layer"](x)
        out = out[0] if isinstance(out, tuple) else out
    assert widths == [8]
    assert torch.allclose(out, expected, atol=1e-5)


def test_declared_blocks_and_zero_init_experts_leave_the_backbone_unchanged():
    registry.discover()
    cfg = resolve_config(["stream=synthetic-tiny", "method=moe-adapters", "seed=0"])
    fresh = registry.BACKBONES[cfg.backbone.name](cfg)
    m = build()
    # every residual block of both towers (2 + 2 in tiny-clip), declared by the backbone
    assert sorted(m.blocks) == ["transformer.resblocks.0", "transformer.resblocks.1",
                                "visual.transformer.resblocks.0", "visual.transformer.resblocks.1"]
    assert set(adapted_modules(m.backbone.model)) == set(m.blocks)
    assert set(m.adapters()) == {f"model.{n}" for n in m.blocks}
    m.meta_begin_task(0, None)
    batch = image_batch(m)
    tokens = m.backbone.tokenize(["a photo of a cat.", "a drawing of a dog."])
    m.eval()
    with torch.no_grad(), m.routing(0):
        assert torch.allclose(m.backbone.encode_image(batch["x"]), fresh.encode_image(batch["x"]), atol=1e-6)
        assert torch.allclose(m.backbone.encode_text(tokens), fresh.encode_text(tokens), atol=1e-6)
    perturb_experts(m)  # trained experts do change both towers
    with torch.no_grad(), m.routing(0):
        assert not torch.allclose(m.backbone.encode_image(batch["x"]), fresh.encode_image(batch["x"]), atol=1e-4)
        assert not torch.allclose(m.backbone.encode_text(tokens), fresh.encode_text(tokens), atol=1e-4)
    with torch.no_grad(), m.routing(-1):  # route -1: the zero-shot model
        assert torch.allclose(m.backbone.encode_image(batch["x"]), fresh.encode_image(batch["x"]), atol=1e-6)


# ------------------------------------------------------------------------------------ the mixture
def test_expert_shape_and_initialisation():
    layer = MoEAdapterLayer(16, experts=22, bottleneck=64)
    assert len(layer.experts) == 22
    e = layer.experts[3]
    assert tuple(e.down.weight.shape) == (64, 16) and tuple(e.up.weight.shape) == (16, 64)
    assert (e.up.weight == 0).all() and (e.up.bias == 0).all() and (e.down.bias == 0).all()
    assert e.down.weight.abs().sum() > 0


def test_mixture_matches_a_hand_computed_top2_mixture():
    torch.manual_seed(0)
    layer = MoEAdapterLayer(6, experts=4, bottleneck=3, top_k=2, dropout=0.0, scale=0.1)
    layer.grow()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
    layer.eval()
    layer.set_route(0)
    u = torch.randn(2, 3, 6)
    out = layer(u)
    for b in range(2):
        logits = u[b, 0] @ layer.gate[0]
        top = logits.topk(2)
        w = torch.softmax(top.values, -1)
        ref = sum(w[j] * 0.1 * layer.experts[int(e)].up(torch.relu(layer.experts[int(e)].down(u[b])))
                  for j, e in enumerate(top.indices))
        assert torch.allclose(out[b], ref, atol=1e-5)


def test_noisy_gating_is_deterministic_at_evaluation_only():
    torch.manual_seed(0)
    layer = MoEAdapterLayer(8, experts=6, bottleneck=4, top_k=2)
    layer.grow()
    with torch.no_grad():
        layer.gate[0].normal_()
        layer.noise[0].normal_()
    u0 = torch.randn(32, 8)
    layer.eval()
    g1, i1, _ = layer.gates(u0, 0)
    g2, i2, _ = layer.gates(u0, 0)
    assert torch.equal(g1, g2) and torch.equal(i1, i2)
    clean = u0 @ layer.gate[0]
    assert torch.equal(i1, clean.topk(2).indices)
    assert torch.allclose(g1.sum(-1), torch.ones(32)) and ((g1 > 0).sum(-1) == 2).all()
    layer.train()
    draws = [layer.gates(u0, 0)[0] for _ in range(3)]
    assert not torch.equal(draws[0], draws[1]) or not torch.equal(draws[1], draws[2])


def test_per_sample_routes_and_zero_shot_samples():
    torch.manual_seed(0)
    layer = MoEAdapterLayer(6, experts=4, bottleneck=3, dropout=0.0)
    layer.grow()
    layer.grow()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
    layer.eval()
    u = torch.randn(3, 2, 6)
    layer.set_route(torch.tensor([1, -1, 0]))
    mixed = layer(u)
    layer.set_route(1)
    assert torch.allclose(mixed[0], layer(u)[0], atol=1e-6)
    layer.set_route(0)
    assert torch.allclose(mixed[2], layer(u)[2], atol=1e-6)
    assert (mixed[1] == 0).all()


def test_activate_freeze_freezes_exactly_the_most_selected_experts():
    torch.manual_seed(0)
    layer = MoEAdapterLayer(8, experts=10, bottleneck=4, top_k=2, freeze_top=2)
    layer.grow()
    with torch.no_grad():  # the router prefers experts 4 and 9 for every input, far above the noise
        layer.gate[0][:, 4] = 50.0
        layer.gate[0][:, 9] = 49.0
    layer.train()
    layer.set_route(0)
    u = torch.rand(16, 3, 8) + 0.5   # positive first tokens: logits 50 * sum(u0) >> noise
    layer(u).sum().backward()
    assert layer.selection_counts[0, 4] == 16 and layer.selection_counts[0, 9] == 16
    assert layer.selection_counts[0].sum() == 32
    assert layer.freeze() == [4, 9]
    frozen = [e for e, ex in enumerate(layer.experts) if not any(p.requires_grad for p in ex.parameters())]
    assert frozen == [4, 9]
    assert not layer.gate[0].requires_grad and not layer.noise[0].requires_grad
    # task 2: a new trainable router; counts 7 > 5 > 1 pick experts 1 and 3, added to the frozen set
    layer.grow()
    assert layer.gate[1].requires_grad
    counts = torch.zeros(10, dtype=torch.float64)
    counts[[1, 3, 5]] = torch.tensor([5.0, 7.0, 1.0], dtype=torch.float64)
    assert layer.freeze(counts) == [1, 3]
    assert layer.expert_frozen.nonzero().flatten().tolist() == [1, 3, 4, 9]


def test_balance_loss_is_emitted_only_when_switched_on():
    from moram_bench.adapters import aux_loss

    for coef, expect in ((0.0, 0), (0.01, 1)):
        torch.manual_seed(0)
        layer = MoEAdapterLayer(8, experts=6, bottleneck=4, balance_coef=coef)
        layer.grow()
        layer.train()
        layer.set_route(0)
        with aux_loss.collect() as terms:
            layer(torch.randn(5, 2, 8))
        assert len(terms) == expect
        if expect:
            assert terms[0].requires_grad and float(terms[0].detach()) >= 0


# ------------------------------------------------------------------------------------ DDAS
def domains(n, seed, dim=32, k=3):
    """``k`` well separated domains: Gaussian clusters around far-apart centres."""
    g = torch.Generator().manual_seed(1234)
    centres = torch.randn(k + 1, dim, generator=g) * 3.0
    g = torch.Generator().manual_seed(seed)
    return [centres[i] + 0.3 * torch.randn(n, dim, generator=g) for i in range(k + 1)]


def test_ddas_picks_the_task_of_the_data_and_falls_back_to_zero_shot():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train = domains(64, seed=0)
    test = domains(40, seed=1)
    ddas = DDAS(32, code=100)
    assert ddas.code == 8  # a bottleneck: capped at dim // 4
    assert (ddas.choose(test[0]) == -1).all()  # no autoencoder yet: zero-shot
    for t in range(3):
        ddas.grow()
        ddas.fit(t, train[t], iterations=300, batch_size=64, generator=torch.Generator().manual_seed(t))
    for t in range(3):
        per_sample = ddas.choose(test[t])
        assert (per_sample == t).float().mean() >= 0.9, (t, per_sample)  # thresholds: 99 % quantiles
        assert (ddas.choose(test[t], per_batch=True) == t).all()
    ood = torch.randn(40, 32, generator=torch.Generator().manual_seed(7)) * 3.0  # no task saw anything like it
    assert (ddas.choose(ood) == -1).float().mean() >= 0.95
    assert (ddas.choose(ood, per_batch=True) == -1).all()
    # an absolute threshold below every error sends everything to zero-shot
    ddas.thresholds[:] = 1e-9
    assert (ddas.choose(test[0]) == -1).all()


def test_ddas_routing_statistics():
    torch.set_num_threads(1)
    ddas = DDAS(32)
    train = domains(32, seed=0)
    for t in range(2):
        ddas.grow()
        ddas.fit(t, train[t], iterations=100, generator=torch.Generator().manual_seed(t))
    test = domains(10, seed=1)
    ddas.record_routing = True
    ddas.choose(test[0])
    ddas.choose(torch.randn(10, 32, generator=torch.Generator().manual_seed(7)) * 3.0)
    assert int(ddas.routing_tokens) == 20
    assert ddas.routing_mass_by_task().sum() + ddas.routing_fallback == 20
    assert ddas.routing_mass_by_task()[0] >= 9 and int(ddas.routing_fallback) >= 9
    ddas.reset_routing()
    assert int(ddas.routing_tokens) == 0 and ddas.routing_mass_by_task().sum() == 0


# ------------------------------------------------------------------------------------ method
def test_bad_settings_are_config_errors():
    from moram_bench.config import ConfigError

    with pytest.raises(ConfigError, match="top_k"):
        build("method.top_k=30")
    with pytest.raises(ConfigError, match="ddas_threshold"):
        build("method.ddas_threshold=-1")


def test_lifecycle_checkpoint_and_resume_replay():
    m = build("method.ddas_iterations=20")
    dm = data(m)
    for t in range(2):
        m.meta_begin_task(t, dm)
        perturb_experts(m, seed=t)
        m.train()
        with torch.no_grad():  # training forwards: selection counts
            m.protocol.loss(image_batch(m, n=8, task=t), t)
        m.meta_end_task(t, dm)
    layer = m.moe_layers()[0]
    assert layer.n_routers == 2 and 2 <= int(layer.expert_frozen.sum()) <= 4
    assert m.ddas.n_tasks == 2 and torch.isfinite(m.ddas.thresholds).all()
    state = m.grown_state()
    assert any(".adapter.experts." in k for k in state) and any(k.startswith("ddas.") for k in state)

    r = build("method.ddas_iterations=20")
    for t in range(2):
        r.meta_begin_task(t, None, restoring=True)
        r.meta_end_task(t, None, restoring=True)
    r.load_grown_state(state)
    for a, b in zip(m.moe_layers(), r.moe_layers()):
        assert torch.equal(a.expert_frozen, b.expert_frozen)
        assert [p.requires_grad for p in a.parameters()] == [p.requires_grad for p in b.parameters()]
    batch = image_batch(m, n=6, task=1)
    outs = []
    for mod in (m, r):
        mod.eval()
        with torch.no_grad():
            mod.protocol.on_eval_start()
            outs.append(mod.protocol.logits(batch, 1))
            mod.protocol.on_eval_end()
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    facts = r.extra_metrics()
    assert "AlexNet" in facts["ddas_features"] and facts["ddas_batch"] is False
    assert len(facts["expert_usage"]) == 4


def test_batch_ddas_switch_gives_one_router_per_batch():
    m = build("method.ddas_iterations=20", "method.ddas_batch=true")
    dm = data(m)
    for t in range(2):
        m.meta_begin_task(t, dm)
        m.meta_end_task(t, dm)
    batch = {"x": torch.cat([image_batch(m, n=3, task=0)["x"], image_batch(m, n=3, task=1)["x"]])}
    routes = m.choose_routes(batch)
    assert routes.shape == (6,) and (routes == routes[0]).all()
    assert m.display_name() == "moe-adapters (batch DDAS)" and m.extra_metrics()["ddas_batch"] is True


# ------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_fit_synthetic_tiny_with_routing_report(tmp_path):
    from moram_bench.__main__ import main

    out = tmp_path / "run"
    assert main(["fit", "stream=synthetic-tiny", f"output_dir={out}", "trainer.enable_progress_bar=false",
                 f"cache_dir={tmp_path}/cache", "method=moe-adapters", "method.optim.lr=0.01",
                 "method.ddas_iterations=50"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "moe-adapters"
    assert "AlexNet" in m["method_settings"]["ddas_features"]
    routing = json.loads((out / "routing.json").read_text())
    assert len(routing["matrix"]) == 3 and routing["fallback_rate"] is not None
    assert (out / "routing.csv").is_file()


@pytest.mark.slow
def test_two_process_ddp_fit(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "moram_bench", "fit", "stream=synthetic-tiny", "method=moe-adapters",
           "method.ddas_iterations=30", "stream.iterations=4", f"output_dir={out}", f"cache_dir={tmp_path}/cache",
           "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.strategy=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    usage = m["method_settings"]["expert_usage"]
    # counts summed over both ranks before freezing: 2 experts per block per task (3 tasks)
    assert all(2 <= len(u["frozen"]) <= 6 for u in usage.values())
    assert np.isfinite(m["last"])
