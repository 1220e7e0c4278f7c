"""The CLIP training loss against the official X-TAIL formula, computed independently on
small tensors: a batch with repeated labels at a task with earlier classes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from moram_bench.config import ConfigError
from moram_bench.protocols.clip import ClipProtocol
from moram_bench.streams.base import Stream, Task

DIM = 5


class PromptBackbone(nn.Module):
    """A stand-in CLIP: each distinct prompt has a learnable embedding; images arrive as
    features and go through one learnable linear head."""

    def __init__(self, prompts: list[str]):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.vocab = {p: i for i, p in enumerate(prompts)}
        self.table = nn.Parameter(torch.randn(len(prompts), DIM, generator=g))
        self.head = nn.Linear(DIM, DIM)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def tokenize(self, prompts):
        return torch.tensor([self.vocab[p] for p in prompts])

    def encode_text(self, tokens):
        return self.table[tokens]

    def image_trunk(self, x):
        return x

    def image_head(self, x):
        return self.head(x)


class FakeModule:
    def __init__(self, stream, backbone, norm=None):
        self.stream, self.backbone, self.device = stream, backbone, torch.device("cpu")
        self.run_cfg = OmegaConf.create({"stream": {} if norm is None else {"clip_text_loss": norm}})


def make_stream(sizes=(3, 4)):
    tasks = [Task(name=f"t{k}", train=[0], test=[0], classnames=[f"c{k}_{j}" for j in range(n)],
                  template="a {}.") for k, n in enumerate(sizes)]
    return Stream("fake", "image", tasks)


def official_loss(bb: PromptBackbone, stream: Stream, feats, labels, task):
    """The official X-TAIL step, written from its description: logits over ALL seen classes
    (earlier prompts without grad, then the current ones), earlier classes masked to -inf
    on the image side; transposed logits (C x B) with the multi-hot target mask[c, i] =
    [label_i == c] and probability-target cross-entropy (mean over the C rows)."""
    earlier = [p for t in stream.tasks[:task] for p in t.prompts()]
    current = stream.tasks[task].prompts()
    with torch.no_grad():
        old = F.normalize(bb.encode_text(bb.tokenize(earlier)), dim=-1) if earlier else torch.zeros(0, DIM)
    cur = F.normalize(bb.encode_text(bb.tokenize(current)), dim=-1)
    emb = torch.cat([old, cur])
    out = F.normalize(bb.image_head(feats), dim=-1)
    scale = bb.logit_scale.exp()
    logits = scale * out @ emb.t()
    logits[:, :len(earlier)] = float("-inf")
    ce_img = F.cross_entropy(logits, labels)
    mask = (labels.view(-1, 1) == torch.arange(emb.shape[0]).view(1, -1)).float().t()
    ce_txt = F.cross_entropy(scale * emb @ out.t(), mask)
    return ce_img + ce_txt, ce_img, ce_txt


def batch_for(stream, task, labels_local, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = stream.tasks[task]
    labels = torch.tensor(labels_local) + t.label_offset
    return {"x": torch.randn(len(labels), DIM, generator=g), "label": labels, "is_feature": True}


def grads(bb, loss):
    bb.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in (bb.table, bb.head.weight, bb.head.bias)]


def test_default_text_side_matches_the_official_formula():
    stream = make_stream((3, 4))
    bb = PromptBackbone(stream.all_prompts())
    task = 1  # C = 3 earlier + 4 current = 7 seen classes
    # repeated labels, one current class (index 3) absent from the batch
    batch = batch_for(stream, task, [0, 0, 1, 2, 2, 2, 0, 1, 1])
    proto = ClipProtocol(FakeModule(stream, bb))
    assert proto.text_norm == "classes" and proto.seen_classes(task) == 7
    assert stream.settings["clip_text_loss"] == "classes"  # recorded with the run
    ours, _ = proto.loss(batch, task)
    ref, ce_img, ce_txt = official_loss(bb, stream, batch["x"], batch["label"], task)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(grads(bb, ours), grads(bb, official_loss(bb, stream, batch["x"], batch["label"], task)[0])):
        torch.testing.assert_close(a, b)


def test_batch_switch_divides_the_same_per_sample_terms_by_b():
    stream = make_stream((3, 4))
    bb = PromptBackbone(stream.all_prompts())
    task, local = 1, [0, 0, 1, 2, 2, 2, 0, 1, 1]
    batch = batch_for(stream, task, local)
    ours, _ = ClipProtocol(FakeModule(stream, bb, "batch")).loss(batch, task)
    _, ce_img, ce_txt = official_loss(bb, stream, batch["x"], batch["label"], task)
    C, B = 7, len(local)
    torch.testing.assert_close(ours, ce_img + ce_txt * C / B)
    # and the per-sample terms by hand: row i = sample i's class prompt against every image
    with torch.no_grad():
        text = F.normalize(bb.table[3:7], dim=-1)
        img = F.normalize(bb.head(batch["x"]), dim=-1)
        t_logits = bb.logit_scale.exp() * text[torch.tensor(local)] @ img.t()
        per_sample = -torch.log_softmax(t_logits, dim=1).diagonal()
    torch.testing.assert_close(ce_txt.detach(), per_sample.sum() / C)


def test_first_task_and_a_single_class_batch():
    stream = make_stream((2, 3))
    bb = PromptBackbone(stream.all_prompts())
    batch = batch_for(stream, 0, [1, 1, 1, 1], seed=3)
    ours, _ = ClipProtocol(FakeModule(stream, bb)).loss(batch, 0)
    torch.testing.assert_close(ours, official_loss(bb, stream, batch["x"], batch["label"], 0)[0])


def test_bad_switch_is_a_config_error():
    stream = make_stream()
    with pytest.raises(ConfigError, match="clip_text_loss"):
        ClipProtocol(FakeModule(stream, PromptBackbone(stream.all_prompts()), "mean"))
