"""The LLM track: tokenisation/masking/padding of the text protocol, the tiny Llama fitting a
text stream end to end with moram, seq-lora and olora, the TRACE / O-LoRA / trace-mini
loaders on fixtures written in the exact formats (malformed cases included), the local
causal-LM folder backbone and the O-LoRA adapter."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from moram_bench.backbones.llm import build_hf_causal_lm, build_tiny_llama
from moram_bench.config import ConfigError
from moram_bench.protocols.text import (IGNORE, PromptEncoder, TextProtocol, answer_loss, generation_batch,
                                        text_settings, training_batch, truncate)
from moram_bench.streams.base import Stream, StreamError, Task
from moram_bench.streams.olora import OLORA_ORDERS, build_olora, format_input
from moram_bench.streams.textdata import TextPairs
from moram_bench.streams.trace import TRACE_EPOCHS, TRACE_SCORERS, TRACE_TASKS, build_trace


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: tiny models gain nothing from more, and parallel test workers or
    other processes on the machine make extra threads very slow (conftest restores it)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llama(OmegaConf.create({"backbone": {"init_seed": 0}}))


def encoder(bb, **kw):
    return PromptEncoder(bb.tokenizer, text_settings(None, **kw), bb.eos_token_ids)


# ---- tokenisation, masking, padding -----------------------------------------------------------
def test_answer_only_loss_masks_prompt_and_padding(tiny):
    enc = encoder(tiny, system_prompt="Answer briefly.")
    tok = tiny.tokenizer
    prompts, answers = ["What is 2+2?", "Name a colour, please."], ["4", "blue"]
    ids, mask, labels = training_batch(enc, prompts, answers, tok.pad_token_id)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        n_prompt = len(enc.prompt_ids(p))
        answer = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # ends the assistant turn
        n = n_prompt + len(answer)
        assert labels[i, :n_prompt].eq(IGNORE).all()            # no loss on the prompt
        assert labels[i, n_prompt:n].tolist() == answer         # the answer and its end token
        assert labels[i, n:].eq(IGNORE).all() and mask[i, n:].eq(0).all()  # right padding
        assert ids[i, :n].tolist() == enc.prompt_ids(p) + answer
    assert tok.decode(ids[1, mask[1].bool()]).endswith("<|assistant|>blue</s>")
    # the LM head applied at answer positions only gives exactly the full-logits loss
    loss, n_tokens = answer_loss(tiny.model, ids, mask, labels)
    logits = tiny.model(input_ids=ids, attention_mask=mask).logits
    full = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    assert n_tokens == int((labels != IGNORE).sum())
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)


def test_left_truncation_keeps_the_end_and_the_template(tiny):
    tok = tiny.tokenizer
    long_prompt = "START " + "filler " * 60 + "QUESTION: which one?"
    enc = encoder(tiny, system_prompt="Be brief.", max_prompt_tokens=80)
    ids = enc.prompt_ids(long_prompt)
    assert len(ids) == 80
    text = tok.decode(ids)
    assert text.startswith("<|system|>Be brief.\n<|user|>")   # the chat wrapper survives
    assert text.endswith("QUESTION: which one?\n<|assistant|>")  # so does the end of the prompt
    assert "START" not in text
    both = tok.decode(encoder(tiny, max_prompt_tokens=80, truncation="middle").prompt_ids(long_prompt))
    assert "START" in both and "which one?" in both
    assert truncate(list(range(10)), 4, "left") == [6, 7, 8, 9]
    assert truncate(list(range(10)), 4, "right") == [0, 1, 2, 3]
    assert truncate(list(range(10)), 5, "middle") == [0, 1, 2, 8, 9]
    assert truncate([1, 2], 5, "left") == [1, 2]


def test_raw_prompts_without_chat_template(tiny):
    enc = encoder(tiny, chat_template=False)
    assert tiny.tokenizer.decode(enc.prompt_ids("abc")) == "abc"
    assert enc.answer_ids("x")[-1] == tiny.tokenizer.eos_token_id


def _protocol(bb, tasks=None, prefix_hook=None, **settings):
    tasks = tasks or [Task("t", TextPairs(["a"], ["b"]), TextPairs(["a"], ["b"]), scorer="exact_match", max_new_tokens=5)]

    class Holder:  # the parts of a ContinualModule the protocol uses
        backbone = bb
        stream = Stream("s", "text", tasks, settings=text_settings(None, **settings))
        device = torch.device("cpu")

        def text_prefix(self, prompt_ids, prompt_mask):  # ContinualModule's hook
            return (None if prefix_hook is None else prefix_hook(prompt_ids, prompt_mask)), {}

    return TextProtocol(Holder())


def test_batched_generation_pads_left_and_matches_one_by_one(tiny):
    pad = tiny.tokenizer.pad_token_id
    ids, mask = generation_batch([[5, 6, 7], [8]], pad)
    assert ids.tolist() == [[5, 6, 7], [pad, pad, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    proto = _protocol(tiny, gen_batch_size=8)
    prompts = ["hi", "a much longer prompt than the first one", "medium prompt"]
    # next-token logits of a left-padded batch equal those of each prompt alone
    enc = [proto.encoder.prompt_ids(p) for p in prompts]
    ids, mask = generation_batch(enc, pad)
    with torch.no_grad():
        batched = tiny.model(input_ids=ids, attention_mask=mask).logits[:, -1]
        for i, e in enumerate(enc):
            alone = tiny.model(input_ids=torch.tensor([e])).logits[0, -1]
            assert torch.allclose(batched[i], alone, atol=1e-4)
    together = proto.generate(prompts, max_new_tokens=6)
    assert together == [proto.generate([p], max_new_tokens=6)[0] for p in prompts]


def test_input_prefix_hook_sees_prompts_only_and_is_prepended(tiny):
    """An L2P-style method's prefix embeddings: the hook gets the left-padded prompts (never
    the answers); the loss and generation use [prefix; input embeddings]."""
    torch.manual_seed(0)
    table = torch.randn(2, 3, tiny.model.config.hidden_size) * 0.5  # prefix chosen by the first prompt token
    seen = []

    def hook(prompt_ids, prompt_mask):
        seen.append((prompt_ids.clone(), prompt_mask.clone()))
        first = prompt_ids[torch.arange(len(prompt_ids)), prompt_mask.argmax(1)]
        return table[first % 2]

    proto = _protocol(tiny, prefix_hook=hook, chat_template=False)
    prompts, answers = ["abc", "a much longer prompt"], ["x", "yz"]
    loss, out = proto.loss({"prompt": prompts, "answer": answers}, 0)
    ids, mask = seen[-1]
    assert [tiny.tokenizer.decode(r[m.bool()]) for r, m in zip(ids, mask)] == prompts  # no answer inside
    t_ids, t_mask, labels = training_batch(proto.encoder, prompts, answers, proto.pad_id)
    emb = tiny.model.get_input_embeddings()(t_ids)
    prefix = hook(ids, mask)
    logits = tiny.model(inputs_embeds=torch.cat([prefix, emb], 1),
                        attention_mask=torch.cat([torch.ones(2, 3, dtype=torch.long), t_mask], 1)).logits[:, 3:]
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    assert proto.generate(prompts, 5) == [proto.generate([p], 5)[0] for p in prompts]
    plain = _protocol(tiny, chat_template=False)
    assert plain.loss({"prompt": prompts, "answer": answers}, 0)[0].item() != pytest.approx(loss.item())


def test_fine_tuned_model_generates_its_answers(tiny):
    """Training and generation agree on the format: a copy of the tiny model fine-tuned on
    four pairs answers them exactly, in one batch, stopping at the end-of-turn token."""
    bb = build_tiny_llama(OmegaConf.create({"backbone": {"init_seed": 1}}))
    pairs = [("What is 2+2?", "4"), ("Capital of France?", "Paris"), ("Colour of grass?", "green"),
             ("Opposite of hot?", "cold")]
    task = Task("mem", TextPairs(*zip(*pairs)), TextPairs(*zip(*pairs)), scorer="exact_match", max_new_tokens=8)
    proto = _protocol(bb, tasks=[task], system_prompt="Answer briefly.")
    params = list(bb.model.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=3e-3)
    torch.manual_seed(0)
    bb.model.train()
    prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    for _ in range(120):
        ids, mask, labels = training_batch(proto.encoder, prompts, answers, proto.pad_id)
        loss, _ = answer_loss(bb.model, ids, mask, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bb.model.eval()
    assert proto.generate(prompts, max_new_tokens=8) == answers
    scores = proto.scores({"prompt": prompts, "answer": answers}, 0)
    assert scores.dtype == torch.float64 and scores.tolist() == [100.0] * 4


# ---- fixtures in the real formats ------------------------------------------------------------------
def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def trace_fixture(root: Path, tasks=TRACE_TASKS, n_train=6, n_test=3, answers=None) -> Path:
    words = "apple river stone cloud music paper light green quick table".split()
    rng = np.random.default_rng(0)
    for t in tasks:
        ans = (answers or {}).get(t, "A")
        for split, n in (("train", n_train), ("eval", 2), ("test", n_test)):
            recs = [{"prompt": " ".join(rng.choice(words, 3)) + f" ({t} {split} {i})\nAnswer:", "answer": ans}
                    for i in range(n)]
            write_json(root / t / f"{split}.json", recs)
    return root


def olora_fixture(root: Path, tasks, n_train=5, n_test=3) -> Path:
    kinds = {"dbpedia": "TC", "agnews": "TC", "yahoo": "TC", "amazon": "SC"}
    for t in tasks:
        labels = ["positive", "negative"] if kinds.get(t) == "SC" else ["world", "sports", "sci/tech"]
        folder = root / "CL_Benchmark" / kinds.get(t, "Other") / t
        write_json(folder / "labels.json", labels)
        for split, n in (("train", n_train), ("dev", 2), ("test", n_test)):
            write_json(folder / f"{split}.json",
                       [{"sentence": f"{t} {split} sentence {i}", "label": labels[i % len(labels)]} for i in range(n)])
    return root


def run_cfg(stream: str, data_dir, **stream_keys):
    from moram_bench.config import resolve_config

    overrides = [f"stream={stream}", "backbone=tiny-llama"]
    if data_dir is not None:
        overrides.append(f"data_dir={data_dir}")
    for k, v in stream_keys.items():
        overrides.append(f"stream.{k}={v}")
    return resolve_config(overrides)


# ---- TRACE loader ------------------------------------------------------------------------------
def test_trace_loader_official_order_scorers_epochs(tmp_path):
    trace_fixture(tmp_path / "TRACE")
    stream = build_trace(run_cfg("trace", tmp_path / "TRACE"))
    assert stream.modality == "text" and stream.task_names == list(TRACE_TASKS)
    assert [t.scorer for t in stream.tasks] == [TRACE_SCORERS[n] for n in TRACE_TASKS]
    assert [t.epochs for t in stream.tasks] == [2, 1, 3, 2, 1, 2, 2, 3] == [TRACE_EPOCHS[n] for n in TRACE_TASKS]
    t0 = stream.tasks[0]
    assert len(t0.train) == 6 and len(t0.test) == 3
    assert t0.train[0]["answer"] == "A" and t0.train[0]["prompt"].endswith("(C-STANCE train 0)\nAnswer:")
    assert stream.settings["repetition_penalty"] == 1.2 and stream.settings["chat_template"] is False
    # caps, task selection and one epoch value for all tasks
    small = build_trace(run_cfg("trace", tmp_path / "TRACE", max_train=4, max_test=2, epochs=1,
                                tasks="[fomc,Py150]"))
    assert small.task_names == ["FOMC", "Py150"] and [t.epochs for t in small.tasks] == [None, None]
    assert len(small.tasks[0].train) == 4 and len(small.tasks[0].test) == 2
    again = build_trace(run_cfg("trace", tmp_path / "TRACE", max_train=4, tasks="[FOMC]"))
    assert again.tasks[0].train.prompts == small.tasks[0].train.prompts  # fixed-seed subsets


def test_trace_loader_errors_are_one_line_and_name_the_path(tmp_path):
    with pytest.raises(StreamError, match=r"needs data_dir=PATH"):
        build_trace(run_cfg("trace", None))
    with pytest.raises(StreamError, match="does not exist"):
        build_trace(run_cfg("trace", tmp_path / "nowhere"))
    root = trace_fixture(tmp_path / "T", tasks=TRACE_TASKS[:3])
    with pytest.raises(StreamError) as e:
        build_trace(run_cfg("trace", root))
    assert str(root / "Py150") in str(e.value) and "test.json" in str(e.value)
    (root / "FOMC" / "test.json").unlink()
    with pytest.raises(StreamError, match=r"missing file .*FOMC/test\.json \(expected a JSON list"):
        build_trace(run_cfg("trace", root, tasks="[FOMC]"))
    (root / "FOMC" / "test.json").write_text('[{"prompt": "a", "answer": ')
    with pytest.raises(StreamError) as e:
        build_trace(run_cfg("trace", root, tasks="[FOMC]"))
    msg = str(e.value)
    assert msg.startswith("malformed JSON in ") and "FOMC/test.json" in msg and "expected" in msg and "\n" not in msg
    write_json(root / "FOMC" / "test.json", [{"prompt": "a", "output": "b"}])
    with pytest.raises(StreamError, match=r"test\.json: no field 'answer'"):
        build_trace(run_cfg("trace", root, tasks="[FOMC]"))
    with pytest.raises(StreamError, match="unknown task 'nope'"):
        build_trace(run_cfg("trace", root, tasks="[nope]"))


# ---- O-LoRA loader -------------------------------------------------------------------------------
def test_olora_loader_formats_inputs_exactly(tmp_path):
    olora_fixture(tmp_path, OLORA_ORDERS[1])
    stream = build_olora(run_cfg("olora-order1", tmp_path), 1)
    assert stream.task_names == ["dbpedia", "amazon", "yahoo", "agnews"]
    assert all(t.scorer == "exact_match" for t in stream.tasks)
    item = stream.tasks[1].train[1]
    assert item == {"prompt": "What is the sentiment of the following review? Option: positive, negative \n"
                              "amazon train sentence 1\nAnswer:", "answer": "negative"}
    assert format_input("I. ", ["a", "b"], "s") == "I. Option: a, b \ns\nAnswer:"
    # data_dir may also point at CL_Benchmark itself; orders 2 and 3 reorder the same tasks
    assert build_olora(run_cfg("olora-order3", tmp_path / "CL_Benchmark"), 3).task_names == list(OLORA_ORDERS[3])
    custom = build_olora(run_cfg("olora-order2", tmp_path, instructions="{agnews: 'Topic? '}"), 2)
    assert custom.tasks[2].train[0]["prompt"].startswith("Topic? Option: world, sports, sci/tech \n")


def test_olora_loader_errors(tmp_path):
    with pytest.raises(StreamError, match=r"olora-order4 needs data_dir=PATH"):
        build_olora(run_cfg("olora-order4", None), 4)
    root = olora_fixture(tmp_path, ["dbpedia", "amazon", "yahoo"])
    with pytest.raises(StreamError, match=r"missing task folder .*CL_Benchmark/<type>/agnews \(expected CL_Benchmark"):
        build_olora(run_cfg("olora-order1", root), 1)
    folder = root / "CL_Benchmark" / "TC" / "dbpedia"
    (folder / "labels.json").write_text("{not json")
    with pytest.raises(StreamError, match=r"malformed JSON in .*dbpedia/labels\.json"):
        build_olora(run_cfg("olora-order1", root, tasks="[dbpedia]"), 1)
    write_json(folder / "labels.json", ["world"])
    with pytest.raises(StreamError, match=r"dbpedia/train\.json: label '(sports|sci/tech)' is not in .*labels\.json"):
        build_olora(run_cfg("olora-order1", root, tasks="[dbpedia]"), 1)
    write_json(folder / "labels.json", ["world", "sports", "sci/tech"])
    write_json(folder / "test.json", [{"text": "x", "label": "world"}])
    with pytest.raises(StreamError, match=r"dbpedia/test\.json: no field 'sentence'"):
        build_olora(run_cfg("olora-order1", root, tasks="[dbpedia]"), 1)


# ---- trace-mini -------------------------------------------------------------------------------------
def test_trace_mini_stream_and_committed_data():
    import hashlib

    from moram_bench.streams.trace_mini import DEFAULT_DATA_ROOT, build_trace_mini

    stream = build_trace_mini(run_cfg("trace-mini", None))
    assert stream.task_names == ["noun-category", "word-choice", "arithmetic", "shorten", "verb-category"]
    assert [t.scorer for t in stream.tasks] == ["exact_match", "option_letter", "numeric", "sari", "exact_match"]
    assert all(len(t.train) == 320 and len(t.test) == 40 for t in stream.tasks)
    assert stream.settings["system_prompt"] == "Answer briefly." and stream.settings["chat_template"] is True
    arith = stream.tasks[2].test[0]
    assert arith["answer"].isdigit() and arith["prompt"].endswith("Answer with a number.")
    manifest = json.loads((DEFAULT_DATA_ROOT / "manifest.json").read_text())
    for rel, digest in manifest["sha256"].items():
        assert hashlib.sha256((DEFAULT_DATA_ROOT / rel).read_bytes()).hexdigest() == digest, rel
    # train and test never share a prompt
    for t in stream.tasks:
        assert not set(t.train.prompts) & set(t.test.prompts), t.name


# ---- end to end ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["seq-lora", "moram", "olora", "l2p"])
def test_tiny_llama_fits_a_two_task_text_stream(tmp_path, method):
    """Two TRACE-format tasks whose answers are always "A" (task 1) and "B" (task 2)."""
    from moram_bench.__main__ import main

    data = trace_fixture(tmp_path / "data", tasks=("C-STANCE", "FOMC"), n_train=16, n_test=4,
                         answers={"C-STANCE": "A", "FOMC": "B"})
    out = tmp_path / "run"
    rc = main(["fit", "stream=trace", f"data_dir={data}", "stream.tasks=[C-STANCE,FOMC]", "backbone=tiny-llama",
               "stream.task_epochs=null", "stream.iterations=40", "stream.batch_size=4",
               "stream.repetition_penalty=1.0", "stream.no_repeat_ngram_size=0",
               "stream.max_new_tokens={C-STANCE:3,FOMC:3}", f"method={method}", "method.optim.lr=0.01",
               f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}", "trainer.enable_progress_bar=false",
               "trainer.num_threads=1"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    R = np.asarray(m["matrix"])
    assert R.shape == (3, 2) and ((R >= 0) & (R <= 100)).all()
    assert m["method"] == method and m["params_added"] > 0 and m["test_samples_per_task"] == [4, 4]
    assert m["stream_settings"]["max_prompt_tokens"] == 1024
    if method != "l2p":  # prompts alone barely move a random-weight model (see the l2p test below)
        assert R[1, 0] == 100.0  # task 1 learned (from 0: the random model never answers "A")
    if method == "seq-lora":
        # task 2 learned too; both tasks share one input distribution, so answering "B"
        # everywhere (forgetting task 1) is exactly what task 2 teaches one shared LoRA.
        # At least 3 of the 4 test prompts: which of a borderline prompt's two greedy
        # tokens wins differs between CPUs (float summation order), 75 on some, 100 on others.
        assert R[2, 1] >= 75.0 and R[2, 1] > R[1, 1] and R[2, 0] < R[1, 0]
    if method == "olora":
        assert m["method_settings"]["loras_per_layer"] == 2
    if method == "l2p":
        assert m["method_settings"]["placement"] == "llm"


def test_l2p_on_a_causal_lm_prepends_per_sample_prompts_that_train(tmp_path):
    """L2P's LLM placement: the prefix is the selected prompts of each sample (N * L_p
    tokens), the query comes from the frozen un-prompted LM, gradients reach the prompts
    and the pull term reaches the keys; row 0 (before the first task) is un-prompted."""
    from moram_bench import registry
    from moram_bench.config import resolve_config

    data = trace_fixture(tmp_path / "data", tasks=("C-STANCE", "FOMC"), n_train=8, n_test=2,
                         answers={"C-STANCE": "A", "FOMC": "B"})
    cfg = resolve_config(["stream=trace", f"data_dir={data}", "stream.tasks=[C-STANCE,FOMC]", "backbone=tiny-llama",
                          "stream.task_epochs=null", "stream.iterations=2", "method=l2p",
                          "method.train_batch_voting=false",  # per-sample prompts in training too
                          f"cache_dir={tmp_path / 'cache'}"])
    stream = registry.STREAMS[cfg.stream.name](cfg)
    m = registry.METHODS["l2p"](cfg, stream, registry.BACKBONES[cfg.backbone.name](cfg))
    t = stream.tasks[0]
    batch = {"prompt": [t.train[i]["prompt"] for i in range(4)], "answer": [t.train[i]["answer"] for i in range(4)]}
    assert m.protocol.loss(batch, 0)[1]["prefix"] is None  # not prompting before the first task
    m.meta_begin_task(0, None)
    m.train()
    loss, out = m.protocol.loss(batch, 0)
    assert out["prompt_sim"].shape == (4, int(m.hp.top_n))  # the pull term's cosines travel in the outputs
    h = m.hp
    assert out["prefix"].shape == (4, int(h.top_n) * int(h.prompt_length), m.backbone.model.config.hidden_size)
    assert m.extra_metrics()["placement"] == "llm"
    total = loss + m.extra_loss(batch, out)
    total.backward()
    assert m.pool.prompts.grad is not None and m.pool.prompts.grad.abs().sum() > 0
    assert m.pool.keys.grad is not None and m.pool.keys.grad.abs().sum() > 0
    # the prefix is exactly the selected prompts, concatenated in pool-index order
    ids, mask = generation_batch([m.protocol.encoder.prompt_ids(p) for p in batch["prompt"]], m.protocol.pad_id)
    sel = m.pool.select(m._llm_query(ids, mask), int(h.top_n))
    assert torch.equal(m.text_prefix(ids, mask)[0], m.pool.prompts[sel.idx].flatten(1, 2))


# ---- backbones --------------------------------------------------------------------------------------
def test_hf_causal_lm_folder_roundtrip_and_errors(tmp_path, tiny):
    folder = tmp_path / "lm"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    bb = build_hf_causal_lm(OmegaConf.create({"backbone": {"path": str(folder), "dtype": "float32"}}))
    ids = torch.tensor([[5, 70, 71, 72]])
    with torch.no_grad():
        assert torch.allclose(bb.model(input_ids=ids).logits, tiny.model(input_ids=ids).logits, atol=1e-5)
    assert bb.info["adapted_linears"] == 8 and bb.tokenizer.chat_template == tiny.tokenizer.chat_template
    with pytest.raises(ConfigError, match="needs backbone.path=FOLDER"):
        build_hf_causal_lm(OmegaConf.create({"backbone": {"path": None}}))
    with pytest.raises(ConfigError, match="does not exist"):
        build_hf_causal_lm(OmegaConf.create({"backbone": {"path": str(tmp_path / "missing")}}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        build_hf_causal_lm(OmegaConf.create({"backbone": {"path": str(tmp_path / "empty")}}))
    with pytest.raises(ConfigError, match="no nn.Linear matches"):
        build_hf_causal_lm(OmegaConf.create({"backbone": {"path": str(folder), "adapter_targets": ["nothing$"]}}))


def test_gguf_conversion_without_the_gguf_package_is_a_one_line_error(tmp_path, monkeypatch):
    import importlib.util

    from moram_bench.backbones import llm

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match=r"needs the gguf package: pip install -e '\.\[llm\]'"):
        llm.convert_gguf(gguf, tmp_path / "out", log=lambda s: None)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_tiny_llama_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_tiny_llama(OmegaConf.create({"backbone": {"init_seed": 3}}))
    assert torch.rand(1) == before
    b = build_tiny_llama(OmegaConf.create({"backbone": {"init_seed": 3}}))
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))


# ---- O-LoRA adapter --------------------------------------------------------------------------------
def test_olora_layer_freezing_keeps_the_function_and_orthogonality_loss():
    from baselines.olora import OLoRALayer

    torch.manual_seed(0)
    layer = OLoRALayer(6, 5, r=2, alpha=4, dropout=0.0)
    x, y0 = torch.randn(3, 6), torch.randn(3, 5)
    layer.grow()
    assert layer.orthogonality() is None  # nothing earlier to be orthogonal to
    with torch.no_grad():
        layer.B.normal_()
    before = layer(x, y0)
    assert torch.allclose(before, y0 + 2.0 * x @ layer.A.t() @ layer.B.t())
    A1 = layer.A.detach().clone()
    layer.grow()  # freezes task 1, starts task 2 (B zero: the function is unchanged)
    assert torch.allclose(layer(x, y0), before, atol=1e-6)
    assert layer.n_tasks == 2 and layer.frozen_A.shape == (2, 6) and layer.frozen_B.shape == (5, 2)
    assert not layer.frozen_A.requires_grad and layer.A.requires_grad
    orth = layer.orthogonality()
    assert orth.item() == pytest.approx((A1 @ layer.A.t()).abs().sum().item(), rel=1e-6)
    orth.backward()
    assert layer.A.grad is not None and layer.A.grad.abs().sum() > 0
    # the state dict holds the frozen stacks: a layer rebuilt by the same grow calls loads it
    layer.freeze()
    state = layer.state_dict()
    twin = OLoRALayer(6, 5, r=2, alpha=4, dropout=0.0)
    twin.grow(), twin.grow(), twin.freeze()
    twin.load_state_dict(state)
    assert torch.allclose(twin(x, y0), layer(x, y0))
