"""Unfusing nn.MultiheadAttention, and the open_clip backbones built on it.

The unfused module must be a numerically identical drop-in for nn.MultiheadAttention
everywhere open_clip (and torch's own calling conventions) use it, so that adapters can be
injected into q/k/v/out_proj by name without changing the frozen model.
"""
import copy
import json
import warnings

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from moram_bench.adapters.attention import UnfusedMultiheadAttention, unfuse_attention
from moram_bench.adapters.inject import inject_adapters, match_linear_names

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "width": 64, "layers": 2, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "width": 64, "heads": 2, "layers": 2},
}


def tiny_open_clip(seed: int = 0):
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    return CLIP(**copy.deepcopy(TINY_CFG)).eval()


@pytest.fixture(scope="module")
def tokens():
    from open_clip import SimpleTokenizer

    return SimpleTokenizer(context_length=16)(["a picture of a red circle.", "dots", "a drawing of a blue cross."])


# ---- standalone module -----------------------------------------------------------------------
def _inputs(batch_first, n=3, tgt=5, src=7, e=16, kdim=None):
    g = torch.Generator().manual_seed(1)
    kd = kdim or e
    shape = (lambda length, d: (n, length, d)) if batch_first else (lambda length, d: (length, n, d))
    return (torch.randn(*shape(tgt, e), generator=g), torch.randn(*shape(src, kd), generator=g),
            torch.randn(*shape(src, kd), generator=g))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
def test_matches_mha_with_masks(batch_first, need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    nn.init.normal_(mha.in_proj_bias)
    unf = UnfusedMultiheadAttention.from_fused(mha).eval()
    q, k, v = _inputs(batch_first)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[0, -3:] = True
    kpm[2, 0] = True
    bool_mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(2)) < 0.3
    bool_mask[:, 1] = False  # no fully masked rows
    float_mask = torch.randn(3 * 4, 5, 7)  # per-(batch, head) additive mask
    cases = [dict(), dict(key_padding_mask=kpm), dict(attn_mask=bool_mask),
             dict(attn_mask=bool_mask, key_padding_mask=kpm), dict(attn_mask=float_mask),
             dict(attn_mask=float_mask, key_padding_mask=kpm.float() * -1e4)]
    for kw in cases:
        for avg in (True, False):
            ref = mha(q, k, v, need_weights=need_weights, average_attn_weights=avg, **kw)
            out = unf(q, k, v, need_weights=need_weights, average_attn_weights=avg, **kw)
            assert out[0].shape == ref[0].shape
            torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
            if need_weights:
                assert out[1].shape == ref[1].shape
                torch.testing.assert_close(out[1], ref[1], atol=1e-6, rtol=1e-5)
            else:
                assert out[1] is None and ref[1] is None


def test_kdim_vdim_causal_hint_and_unbatched():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True).eval()  # separate q/k/v weights
    unf = UnfusedMultiheadAttention.from_fused(mha)
    assert (unf.q_proj.in_features, unf.k_proj.in_features, unf.v_proj.in_features) == (16, 8, 8)
    q, k, v = _inputs(True, kdim=8)
    torch.testing.assert_close(unf(q, k, v)[0], mha(q, k, v)[0], atol=1e-5, rtol=1e-5)

    self_attn = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    unf = UnfusedMultiheadAttention.from_fused(self_attn)
    x = torch.randn(2, 6, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    for nw in (False, True):
        torch.testing.assert_close(unf(x, x, x, attn_mask=causal, is_causal=True, need_weights=nw)[0],
                                   self_attn(x, x, x, attn_mask=causal, is_causal=True, need_weights=nw)[0])
    with pytest.raises(RuntimeError, match="is_causal"):
        unf(x, x, x, is_causal=True)
    xu = torch.randn(6, 16)  # unbatched (L, E)
    ref, out = self_attn(xu, xu, xu), unf(xu, xu, xu)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1])


def test_dropout_in_training_only():
    mha = nn.MultiheadAttention(16, 4, dropout=0.5).train()
    unf = UnfusedMultiheadAttention.from_fused(mha)
    assert unf.training and unf.dropout == 0.5
    q, k, v = _inputs(False)
    torch.manual_seed(3)
    a = unf(q, k, v, need_weights=False)[0]
    torch.manual_seed(4)
    b = unf(q, k, v, need_weights=False)[0]
    assert not torch.allclose(a, b)  # dropout is active
    torch.manual_seed(3)  # same random stream as the fused module's dropout
    torch.testing.assert_close(a, mha(q, k, v, need_weights=False)[0])
    unf.eval(), mha.eval()
    torch.testing.assert_close(unf(q, k, v)[0], mha(q, k, v)[0])


def test_split_weights_grad_flags_and_gradients():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    mha.in_proj_weight.requires_grad_(False)  # frozen weight, trainable bias
    unf = UnfusedMultiheadAttention.from_fused(mha)
    for i, lin in enumerate((unf.q_proj, unf.k_proj, unf.v_proj)):
        assert type(lin) is nn.Linear
        assert torch.equal(lin.weight, mha.in_proj_weight[16 * i:16 * (i + 1)])
        assert torch.equal(lin.bias, mha.in_proj_bias[16 * i:16 * (i + 1)])
        assert not lin.weight.requires_grad and lin.bias.requires_grad
        assert lin.weight.data_ptr() != mha.in_proj_weight.data_ptr()  # copies, not views
    assert unf.out_proj is mha.out_proj

    x = torch.randn(2, 5, 16)
    mha(x, x, x)[0].square().sum().backward()
    unf(x, x, x)[0].square().sum().backward()
    grads = torch.cat([unf.q_proj.bias.grad, unf.k_proj.bias.grad, unf.v_proj.bias.grad])
    torch.testing.assert_close(grads, mha.in_proj_bias.grad)


def test_fused_state_dict_loads_and_unsupported_options_raise():
    src = nn.MultiheadAttention(16, 4)
    dst = UnfusedMultiheadAttention.from_fused(nn.MultiheadAttention(16, 4))
    dst.load_state_dict(src.state_dict())
    x = torch.randn(5, 2, 16)
    torch.testing.assert_close(dst(x, x, x)[0], src(x, x, x)[0])
    with pytest.raises(ValueError, match="add_bias_kv"):
        UnfusedMultiheadAttention.from_fused(nn.MultiheadAttention(16, 4, add_bias_kv=True))
    with pytest.raises(ValueError, match="add_zero_attn"):
        UnfusedMultiheadAttention.from_fused(nn.MultiheadAttention(16, 4, add_zero_attn=True))
    with pytest.raises(ValueError):
        unfuse_attention(nn.MultiheadAttention(16, 4))


def test_unfuse_leaves_global_rng_untouched():
    model = nn.Sequential(nn.MultiheadAttention(16, 4), nn.MultiheadAttention(16, 4))
    state = torch.random.get_rng_state()
    assert unfuse_attention(model) == 2
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(isinstance(m, UnfusedMultiheadAttention) for m in model)


# ---- inside open_clip ---------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_open_clip_outputs_unchanged(causal, tokens):
    model = tiny_open_clip()
    if not causal:
        model.attn_mask = None  # bidirectional text attention
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img_ref, txt_ref = model.encode_image(images), model.encode_text(tokens)
        fused = copy.deepcopy(model)
        assert unfuse_attention(model) == 4
        assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
        torch.testing.assert_close(model.encode_image(images), img_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), txt_ref, atol=1e-5, rtol=1e-5)
    # the unfused linears hold the split in_proj weights
    for prefix in ("visual.transformer.resblocks.1.attn", "transformer.resblocks.0.attn"):
        old, new = fused.get_submodule(prefix), model.get_submodule(prefix)
        w = torch.cat([new.q_proj.weight, new.k_proj.weight, new.v_proj.weight])
        b = torch.cat([new.q_proj.bias, new.k_proj.bias, new.v_proj.bias])
        assert torch.equal(w, old.in_proj_weight) and torch.equal(b, old.in_proj_bias)
        assert torch.equal(new.out_proj.weight, old.out_proj.weight)
    # a fused open_clip checkpoint still loads into the unfused model
    model.load_state_dict(fused.state_dict())


def test_open_clip_requires_grad_flags_kept():
    model = tiny_open_clip()
    for p in model.parameters():
        p.requires_grad_(False)
    model.transformer.resblocks[1].attn.in_proj_bias.requires_grad_(True)
    unfuse_attention(model)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["transformer.resblocks.1.attn.k_proj.bias", "transformer.resblocks.1.attn.q_proj.bias",
                         "transformer.resblocks.1.attn.v_proj.bias"]


# ---- open_clip backbones --------------------------------------------------------------------------
def _expected_names(blocks: int, prefix: str) -> list[str]:
    return [f"{prefix}transformer.resblocks.{i}.{leaf}" for i in range(blocks)
            for leaf in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")]


def test_tiny_clip_backbone():
    from moram_bench.backbones.clip import ClipBackbone
    from moram_bench.backbones.open_clip_models import build_tiny_clip

    state = torch.random.get_rng_state()
    bb = build_tiny_clip(OmegaConf.create({"backbone": {"name": "tiny-clip"}}))
    assert torch.equal(state, torch.random.get_rng_state())  # seeded privately
    assert isinstance(bb, ClipBackbone) and bb._trunk is None and bb._head is bb.model.visual
    assert not bb.trunk_cacheable and bb.pad_id is None
    names = match_linear_names(bb.model, bb.info["adapter_targets"])
    assert sorted(names) == sorted(_expected_names(2, "visual.") + _expected_names(2, ""))
    assert bb.info["adapter_target_counts"] == {"visual": 12, "text": 12}
    # the same patterns work on the wrapper too (names prefixed with "model.")
    assert len(match_linear_names(bb, bb.info["adapter_targets"])) == 24
    assert bb.info["preprocess_cfg"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])

    tokens = bb.tokenize(["a picture of a red circle.", "a drawing of a pink dots."])
    assert tokens.shape == (2, 16)
    with torch.no_grad():
        img = bb.encode_image(torch.randn(3, 3, 32, 32))
        txt = bb.encode_text(tokens)
    assert img.shape == (3, 32) and txt.shape == (2, 32) and torch.isfinite(img).all()

    # deterministic from init_seed, and a different seed gives different weights
    again = build_tiny_clip({"backbone": {"init_seed": 0}})
    other = build_tiny_clip({"backbone": {"init_seed": 1}})
    w = lambda b: b.model.visual.transformer.resblocks[0].attn.q_proj.weight  # noqa: E731
    assert torch.equal(w(bb), w(again)) and not torch.equal(w(bb), w(other))


def test_adapters_inject_into_every_target():
    from moram_bench.backbones.open_clip_models import build_tiny_clip

    class AddOne(nn.Module):
        def forward(self, x, y0):
            return y0 + 1.0

    bb = build_tiny_clip({})
    with torch.no_grad():
        before = bb.encode_text(bb.tokenize(["a red circle"]))
    wrapped = inject_adapters(bb.model, bb.info["adapter_targets"], lambda name, base: AddOne())
    assert len(wrapped) == 24
    with torch.no_grad():
        after = bb.encode_text(bb.tokenize(["a red circle"]))
    assert not torch.allclose(before, after)  # the adapters are actually called


def _save_local_dir(tmp_path, model):
    folder = tmp_path / "tiny-local"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def test_open_clip_loads_local_weights(tmp_path, tokens):
    """A local-dir folder, a checkpoint file and a TorchScript archive all reproduce the
    fused model's features after unfusing."""
    import open_clip
    from moram_bench.backbones.open_clip_models import build_open_clip

    ref_model = tiny_open_clip(seed=5)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        img_ref, txt_ref = ref_model.encode_image(images), ref_model.encode_text(tokens)

    folder = _save_local_dir(tmp_path, ref_model)
    arch_json = tmp_path / "moram-test-tiny.json"
    arch_json.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(arch_json)  # registers the arch name "moram-test-tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(ref_model)
    scripted.save(str(tmp_path / "tiny_ts.pt"))

    for backbone in ({"pretrained": str(folder)},
                     {"arch": "moram-test-tiny", "pretrained": str(folder / "open_clip_pytorch_model.bin")},
                     {"arch": "moram-test-tiny", "pretrained": str(tmp_path / "tiny_ts.pt")}):
        bb = build_open_clip(OmegaConf.create({"backbone": {**backbone, "context_length": 16}}))
        assert bb.info["unfused_attention"] == 4
        assert bb.info["adapter_target_counts"] == {"visual": 12, "text": 12}
        with torch.no_grad():
            torch.testing.assert_close(bb.encode_image(images), img_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(bb.encode_text(tokens), txt_ref, atol=1e-5, rtol=1e-5)


def test_open_clip_missing_weights_are_one_line_errors(tmp_path):
    from moram_bench.backbones.open_clip_models import build_open_clip

    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(FileNotFoundError) as e:
        build_open_clip({"backbone": {"arch": "ViT-B-16", "pretrained": str(missing)}})
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    # a known tag whose weights are not cached: say where they were looked for, never download
    with pytest.raises(FileNotFoundError) as e:
        build_open_clip({"backbone": {"arch": "ViT-B-16", "pretrained": "openai", "cache_dir": str(tmp_path)}})
    msg = str(e.value)
    assert "looked in" in msg and str(tmp_path) in msg and "\n" not in msg
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        build_open_clip({"backbone": {"pretrained": str(tmp_path)}})


def test_vit_b16_random_build_needs_allow_random():
    from moram_bench.backbones.open_clip_models import build_clip_vit_b16

    with pytest.raises(ValueError, match="allow_random"):
        build_clip_vit_b16({"backbone": {"pretrained": None}})
    with pytest.warns(UserWarning, match="RANDOM weights"):
        bb = build_clip_vit_b16({"backbone": {"pretrained": None, "allow_random": True}})
    names = match_linear_names(bb.model, bb.info["adapter_targets"])
    assert sorted(names) == sorted(_expected_names(12, "visual.") + _expected_names(12, ""))
    assert bb.info["arch"] == "ViT-B-16" and bb.info["embed_dim"] == 512
    assert bb.tokenize(["a photo of a cat."]).shape == (1, 77)
    assert bb.preprocess.transforms[0].size == 224
