"""TRACE decoding and loss as the official runner: joint prompt+answer truncation, per-task
truncation side, per-sample loss averaging and 512 new tokens; our cheaper behaviour as
switches. Tiny tensors and the tiny Llama (random weights, its own small tokenizer)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from moram_bench.backbones.llm import build_tiny_llama
from moram_bench.config import resolve_config
from moram_bench.protocols.text import IGNORE, PromptEncoder, TextProtocol, answer_loss, text_settings, training_batch
from moram_bench.streams.base import Stream, StreamError, Task
from moram_bench.streams.textdata import TextPairs
from moram_bench.streams.trace import TRACE_TASKS, build_trace


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llama(OmegaConf.create({"backbone": {"init_seed": 0}}))


def encoder(bb, **kw):
    return PromptEncoder(bb.tokenizer, text_settings(None, chat_template=False, **kw), bb.eos_token_ids)


def words(n, w="alpha"):
    return " ".join([w] * n)


# ---- truncation -------------------------------------------------------------------------------
def test_joint_truncation_keeps_the_answer_and_cuts_the_prompt(tiny):
    tok = tiny.tokenizer
    prompt, answer = "start " + words(40) + " end:", words(2, "beta")
    ans = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    kw = dict(max_prompt_tokens=20, max_answer_tokens=len(ans) - 4)  # the answer exceeds its own budget
    joint = encoder(tiny, truncation_scope="joint", **kw)
    p, a = joint.training_ids(prompt, answer)
    assert a == ans and len(p) + len(a) == 20 + len(ans) - 4  # the whole answer; the sequence fills the budget
    assert p[:len(joint.prefix)] == joint.prefix
    assert tok.decode(p).endswith("end:")  # left truncation: the prompt's end survives
    p_right, _ = joint.training_ids(prompt, answer, side="right")
    assert "start" in tok.decode(p_right) and not tok.decode(p_right).endswith("end:")
    # separate: each cut to its own budget
    sep = encoder(tiny, truncation_scope="separate", **kw)
    p, a = sep.training_ids(prompt, answer)
    assert len(p) == 20 and a == ans[:len(ans) - 4] + [tok.eos_token_id]
    # a short pair is never cut, whatever the scope
    assert joint.training_ids("hi", "yo") == sep.training_ids("hi", "yo")
    # generation prompts hold max_prompt_tokens in both scopes
    assert len(joint.prompt_ids(prompt)) == 20


def test_joint_truncation_with_an_answer_longer_than_the_budget(tiny):
    enc = encoder(tiny, truncation_scope="joint", max_prompt_tokens=5, max_answer_tokens=3)
    p, a = enc.training_ids(words(20), words(30, "beta"))
    assert len(p) + len(a) == 8 and len(p) - len(enc.prefix) >= 1
    assert a == tiny.tokenizer(words(30, "beta"), add_special_tokens=False)["input_ids"][:len(a)]


def test_per_task_side_and_bad_settings(tiny):
    s = text_settings(None, task_truncation={"MeetingBank": "right"})
    enc = PromptEncoder(tiny.tokenizer, s, tiny.eos_token_ids)
    assert enc.side("meetingbank") == "right" and enc.side("Py150") == "left" and enc.side(None) == "left"
    for bad in ({"truncation_scope": "both"}, {"loss_average": "mean"}, {"task_truncation": {"X": "up"}},
                {"task_truncation": "right"}):
        with pytest.raises(StreamError):
            text_settings(None, **bad)


# ---- loss averaging ---------------------------------------------------------------------------
def test_sample_average_is_the_mean_of_per_sample_token_means(tiny):
    """The official loss: one sample per micro-batch, HF's token mean, micro-batches averaged."""
    enc = encoder(tiny)
    prompts, answers = ["What is 2+2?", "Name a colour."], ["four", words(7, "blue")]
    ids, mask, labels = training_batch(enc, prompts, answers, tiny.tokenizer.pad_token_id)
    counts = (labels[:, 1:] != IGNORE).sum(1)
    assert counts[0] != counts[1]  # unequal answer lengths: the two averages differ
    with torch.no_grad():
        sample, n = answer_loss(tiny.model, ids, mask, labels, average="sample")
        token, _ = answer_loss(tiny.model, ids, mask, labels, average="token")
        per_sample = []
        for p, a in zip(prompts, answers):  # each sample alone, as the official micro-batch of 1
            i1, m1, l1 = training_batch(enc, [p], [a], tiny.tokenizer.pad_token_id)
            logits = tiny.model(input_ids=i1, attention_mask=m1).logits
            per_sample.append(F.cross_entropy(logits[0, :-1], l1[0, 1:], ignore_index=IGNORE))
        logits = tiny.model(input_ids=ids, attention_mask=mask).logits
        terms = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE, reduction="none")
    assert n == int(counts.sum())
    assert sample.item() == pytest.approx(torch.stack(per_sample).mean().item(), rel=1e-4)
    assert token.item() == pytest.approx((terms.sum() / counts.sum()).item(), rel=1e-5)
    assert sample.item() != pytest.approx(token.item(), rel=1e-4)


def test_sample_average_gradient_matches_the_official_accumulation(tiny):
    enc = encoder(tiny)
    prompts, answers = ["a b c", "d"], ["x", words(5, "y")]
    params = [p for p in tiny.model.parameters()][:3]
    for p in tiny.model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        ids, mask, labels = training_batch(enc, prompts, answers, tiny.tokenizer.pad_token_id)
        loss, _ = answer_loss(tiny.model, ids, mask, labels, average="sample")
        ours = torch.autograd.grad(loss, params)
        acc = [torch.zeros_like(p) for p in params]
        for p_, a_ in zip(prompts, answers):
            i1, m1, l1 = training_batch(enc, [p_], [a_], tiny.tokenizer.pad_token_id)
            logits = tiny.model(input_ids=i1, attention_mask=m1).logits
            g = torch.autograd.grad(F.cross_entropy(logits[0, :-1], l1[0, 1:], ignore_index=IGNORE) / 2, params)
            acc = [x + y for x, y in zip(acc, g)]
        for x, y in zip(ours, acc):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    finally:
        for p in tiny.model.parameters():
            p.requires_grad_(False)


def test_protocol_uses_the_tasks_side_and_the_stream_average(tiny):
    long_prompt = "keep this start " + words(60) + " answer:"
    tasks = [Task(n, TextPairs([long_prompt], ["b"]), TextPairs([long_prompt], ["b"]), scorer="exact_match",
                  max_new_tokens=2) for n in ("MeetingBank", "Py150")]

    class Holder:
        backbone = tiny
        stream = Stream("s", "text", tasks, settings=text_settings(
            None, chat_template=False, max_prompt_tokens=16, task_truncation={"MeetingBank": "right"},
            loss_average="sample", truncation_scope="joint"))
        device = torch.device("cpu")

        def text_prefix(self, prompt_ids, prompt_mask):
            return None, {}

    proto = TextProtocol(Holder())
    assert proto.side(0) == "right" and proto.side(1) == "left"
    batch = {"prompt": [long_prompt, "short"], "answer": ["b", "cc dd"]}
    with torch.no_grad():
        loss, out = proto.loss(batch, 0)
        ids, mask, labels = training_batch(proto.encoder, batch["prompt"], batch["answer"], proto.pad_id, "right")
        ref, _ = answer_loss(tiny.model, ids, mask, labels, average="sample")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert "keep this start" in tiny.tokenizer.decode(out["input_ids"][0])


# ---- the trace stream's defaults ------------------------------------------------------------
def test_trace_defaults_are_the_official_ones(tmp_path):
    for name in TRACE_TASKS:
        (tmp_path / name).mkdir()
        for split in ("train", "eval", "test"):
            (tmp_path / name / f"{split}.json").write_text(json.dumps([{"prompt": "p", "answer": "a"}]))
    cfg = resolve_config(["stream=trace", f"data_dir={tmp_path}"])
    s = build_trace(cfg)
    assert [t.max_new_tokens for t in s.tasks] == [512] * 8
    st = s.settings
    assert st["truncation_scope"] == "joint" and st["loss_average"] == "sample"
    assert st["task_truncation"] == {"MeetingBank": "right"} and st["max_prompt_tokens"] == 1024
    assert st["max_answer_tokens"] == 512 and st["repetition_penalty"] == 1.2 and st["no_repeat_ngram_size"] == 3
    json.dumps(st)
    # our cheaper per-task caps remain a switch
    s = build_trace(resolve_config(["stream=trace", f"data_dir={tmp_path}", "stream.max_new_tokens={Py150: 64}"]))
    assert [t.max_new_tokens for t in s.tasks][3] == 64 and s.tasks[0].max_new_tokens == 512
    s = build_trace(resolve_config(["stream=trace", f"data_dir={tmp_path}", "stream.max_new_tokens=32"]))
    assert [t.max_new_tokens for t in s.tasks] == [32] * 8
    mini = resolve_config(["stream=trace-mini"]).stream
    assert mini.truncation_scope == "separate" and mini.loss_average == "token"
