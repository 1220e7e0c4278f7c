"""The text protocol (LLM track): answer-only language-model loss, scoring by generation.

A text task's items are ``{"prompt": str, "answer": str}``; the DataModule's default
``collate`` turns a batch into lists of strings, and everything token-level happens here,
identically for every method on a stream:

- **Prompt formatting.** With ``chat_template`` (stream setting) the prompt is the user turn
  of the tokenizer's chat template, after an optional ``system_prompt``, followed by the
  assistant header; otherwise it is the raw prompt (plus the tokenizer's BOS if it adds one).
- **Truncation.** Only the prompt's own tokens are cut, never the template around them:
  ``left`` (default) drops the beginning and keeps the end of the prompt, where the
  question and its answer cue sit, as TRACE does; ``right`` keeps the beginning; ``middle``
  keeps both ends (instruction first, cue last) and drops the middle. ``task_truncation``
  (``{task name: side}``) overrides the side per task (the official TRACE collator keeps
  the START of MeetingBank's long transcripts, where its instruction sits). Generation
  prompts hold at most ``max_prompt_tokens``. Training sequences: with
  ``truncation_scope=separate`` the prompt is cut to ``max_prompt_tokens`` and the answer
  to ``max_answer_tokens`` (its beginning), independently; with ``joint`` (the official
  TRACE collator) prompt and answer share ``max_prompt_tokens + max_answer_tokens`` and
  only the prompt is cut, so a long answer is kept whole at the expense of its prompt
  (an answer longer than the whole budget keeps its beginning).
- **Training.** ``input = prompt + answer + end-of-turn``, padded on the RIGHT; the loss is
  the cross-entropy over answer tokens (and the end-of-turn token) only, all other
  positions are masked, averaged (``loss_average``) over all answer tokens of the batch
  (``token``) or per sample, then over the samples (``sample``: the official TRACE runner,
  whose micro-batch of one sample is averaged over its own tokens and the micro-batches
  are then averaged by gradient accumulation and data parallelism). The LM head runs only
  at those positions (the vocabulary projection is the most expensive layer of a small
  LM), unless the model post-processes its logits (e.g. Gemma-2 soft-capping), in which
  case the full forward is used.
- **Evaluation.** Batched greedy decoding with a KV cache (``model.generate``), prompts
  padded on the LEFT, sorted by length and cut into chunks of ``gen_batch_size``; at most
  the task's ``max_new_tokens``; stops at the end-of-turn / EOS tokens; optional
  ``repetition_penalty`` / ``no_repeat_ngram_size`` (the official MoRAM TRACE decoding uses
  1.2 and 3). The decoded text (special tokens skipped, stripped) is scored with the task's
  scorer (``moram_bench.text_scorers``) against the answer, with the prompt as source.

Input prefixes (L2P-style prompts): the method's ``text_prefix(prompt_ids, prompt_mask)``
hook (declared on ``ContinualModule``; by default no prefix) is called in training and in
evaluation with the PROMPTS ONLY (left-padded, never the answers) and returns
``(B, P, d_model)`` embeddings or None, plus auxiliary outputs that the training step's
outputs carry (e.g. L2P's selected-key cosines); the embeddings are prepended to the input
embeddings (attended to, never scored), and generation runs from ``inputs_embeds``.

Stream settings (``Stream.settings``, defaults in ``TEXT_DEFAULTS``) are fairness-relevant
and recorded with the run; ``text_settings(cfg.stream)`` builds them from a stream config.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .. import text_scorers
from ..config import ConfigError

IGNORE = -100
TEXT_DEFAULTS: dict[str, Any] = {
    "chat_template": True,      # use the tokenizer's chat template when it has one
    "system_prompt": None,      # system message of the chat template (None: the template's default)
    "max_prompt_tokens": 512,   # prompt + template tokens, after truncation
    "max_answer_tokens": 256,   # answer tokens used for training
    "truncation": "left",       # which part of a too-long prompt is dropped: left | right | middle
    "task_truncation": None,    # {task name: side}: per-task override of `truncation`
    "truncation_scope": "separate",  # separate: prompt and answer cut apart; joint: to their summed budget
    "loss_average": "token",    # token: over the batch's answer tokens; sample: per sample, then over samples
    "gen_batch_size": 32,       # prompts decoded together
    "repetition_penalty": 1.0,  # generation (1.0: off)
    "no_repeat_ngram_size": 0,  # generation (0: off)
}
TRUNCATIONS = ("left", "right", "middle")
TRUNCATION_SCOPES = ("separate", "joint")
LOSS_AVERAGES = ("token", "sample")
_PLACEHOLDER = "\u2063MORAMPROMPT\u2063"


def text_settings(stream_cfg: Any = None, **overrides) -> dict[str, Any]:
    """The protocol settings of a text stream: ``TEXT_DEFAULTS`` updated from the keys of
    a stream config (omegaconf node or dict) and then from ``overrides``."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    from ..streams.base import StreamError

    out = dict(TEXT_DEFAULTS)
    if stream_cfg is not None:
        for k in TEXT_DEFAULTS:
            v = stream_cfg.get(k) if hasattr(stream_cfg, "get") else None
            if v is not None:
                out[k] = v
    out.update({k: v for k, v in overrides.items() if v is not None})
    out = {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
           for k, v in out.items()}
    for key, allowed in (("truncation", TRUNCATIONS), ("truncation_scope", TRUNCATION_SCOPES),
                         ("loss_average", LOSS_AVERAGES)):
        if out[key] not in allowed:
            raise StreamError(f"stream {key}={out[key]!r} is not one of {', '.join(allowed)}")
    per_task = out["task_truncation"]
    if per_task is not None:
        if not isinstance(per_task, dict):
            raise StreamError(f"stream task_truncation must be a mapping task -> side, got {per_task!r}")
        bad = next((f"{t}: {v!r}" for t, v in per_task.items() if v not in TRUNCATIONS), None)
        if bad:
            raise StreamError(f"stream task_truncation has {bad}; sides are {', '.join(TRUNCATIONS)}")
        out["task_truncation"] = {str(t): str(v) for t, v in per_task.items()}
    return out


def truncate(ids: list[int], budget: int, side: str) -> list[int]:
    """Keep at most ``budget`` (>= 1) of ``ids``: drop the ``left`` part, the ``right``
    part or the ``middle`` (keeping the first ceil(budget/2) and the last floor(budget/2))."""
    budget = max(1, int(budget))
    if len(ids) <= budget:
        return list(ids)
    if side == "left":
        return list(ids[-budget:])
    if side == "right":
        return list(ids[:budget])
    head = (budget + 1) // 2
    tail = budget - head
    return list(ids[:head]) + (list(ids[-tail:]) if tail else [])


class PromptEncoder:
    """Turns prompt and answer strings into token ids for one tokenizer and one setting.

    ``prompt_ids(p)``: template prefix + truncated prompt tokens + template suffix (the
    assistant header). ``answer_ids(a)``: the answer's tokens + the end-of-turn tokens.
    ``stop_ids``: token ids that end generation.
    """

    def __init__(self, tokenizer, settings: dict[str, Any], eos_ids: Sequence[int] = ()):
        self.tok = tokenizer
        self.settings = settings
        self.use_chat = bool(settings["chat_template"]) and bool(getattr(tokenizer, "chat_template", None))
        if self.use_chat:
            messages = self._messages(_PLACEHOLDER)
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                turn = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": _PLACEHOLDER}],
                                                     tokenize=False)
            except Exception as e:  # jinja errors, e.g. templates without a system role
                raise ConfigError(f"the tokenizer's chat template failed ({str(e).splitlines()[0]}); "
                                  "try stream.system_prompt=null or stream.chat_template=false") from None
            if text.count(_PLACEHOLDER) != 1:
                raise ConfigError("the tokenizer's chat template does not render the user message verbatim; "
                                  "use stream.chat_template=false")
            prefix, suffix = text.split(_PLACEHOLDER)
            self.prefix = self._encode(prefix)
            self.suffix = self._encode(suffix)
            # the token that closes the assistant turn (<|im_end|>, <|eot_id|>, </s>, ...)
            end = self._encode(turn.split(_PLACEHOLDER)[-1].strip())[:1]
            self.end_of_turn = end if end and end[0] in set(tokenizer.all_special_ids) else []
        else:
            probe = tokenizer("x", add_special_tokens=True)["input_ids"]
            plain = tokenizer("x", add_special_tokens=False)["input_ids"]
            n = len(probe) - len(plain)
            self.prefix = list(probe[:n]) if n > 0 and probe[n:] == plain else []
            self.suffix = []
            self.end_of_turn = []
        if not self.end_of_turn:
            if tokenizer.eos_token_id is None:
                raise ConfigError("the tokenizer has no EOS token to end answers with")
            self.end_of_turn = [int(tokenizer.eos_token_id)]
        stops = list(self.end_of_turn) + [int(i) for i in eos_ids]
        self.stop_ids = list(dict.fromkeys(stops))
        self._cache: dict[str, list[int]] = {}

    def _messages(self, content: str) -> list[dict]:
        msgs = []
        if self.settings.get("system_prompt"):
            msgs.append({"role": "system", "content": str(self.settings["system_prompt"])})
        msgs.append({"role": "user", "content": content})
        return msgs

    def _encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _encode_cached(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = self._encode(text)
            if len(self._cache) < 200_000:
                self._cache[text] = ids
        return ids

    def side(self, task_name: str | None = None) -> str:
        """The truncation side of task ``task_name`` (``task_truncation``, else ``truncation``)."""
        per_task = self.settings.get("task_truncation") or {}
        if task_name is not None:
            for name, side in per_task.items():
                if name.lower() == task_name.lower():
                    return side
        return self.settings["truncation"]

    def prompt_ids(self, prompt: str, side: str | None = None, budget: int | None = None) -> list[int]:
        """Template + the prompt cut to ``budget`` tokens in all (default ``max_prompt_tokens``)."""
        budget = int(self.settings["max_prompt_tokens"]) if budget is None else int(budget)
        body = truncate(self._encode_cached(prompt), budget - len(self.prefix) - len(self.suffix),
                        side or self.settings["truncation"])
        return self.prefix + body + self.suffix

    def answer_ids(self, answer: str) -> list[int]:
        ids = self._encode_cached(answer)[: int(self.settings["max_answer_tokens"])]
        return ids + self.end_of_turn

    def training_ids(self, prompt: str, answer: str, side: str | None = None) -> tuple[list[int], list[int]]:
        """(prompt part, answer part) of one training sequence (``truncation_scope``, module doc)."""
        if self.settings.get("truncation_scope", "separate") != "joint":
            return self.prompt_ids(prompt, side), self.answer_ids(answer)
        total = int(self.settings["max_prompt_tokens"]) + int(self.settings["max_answer_tokens"])
        fixed = len(self.prefix) + len(self.suffix)
        ans = self._encode_cached(answer) + self.end_of_turn
        if fixed + 1 + len(ans) > total:  # the answer alone exceeds the budget: keep its beginning
            ans = ans[:max(1, total - fixed - 1)]
        return self.prompt_ids(prompt, side, budget=total - len(ans)), ans


def training_batch(enc: PromptEncoder, prompts: Sequence[str], answers: Sequence[str], pad_id: int,
                   side: str | None = None):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (prompt and padding
    positions are ``IGNORE``), as int64 tensors of shape (B, L); prompts truncated on
    ``side`` (default: the stream's ``truncation``)."""
    rows, labels = [], []
    for p, a in zip(prompts, answers):
        pi, ai = enc.training_ids(p, a, side)
        rows.append(pi + ai)
        labels.append([IGNORE] * len(pi) + ai)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        lab[i, :len(l)] = torch.tensor(l)
    return ids, mask, lab


def generation_batch(prompt_ids: Sequence[Sequence[int]], pad_id: int):
    """Left-padded ``input_ids`` and ``attention_mask`` (the last column is every prompt's
    last token, where decoding continues)."""
    width = max(len(r) for r in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, r in enumerate(prompt_ids):
        if r:
            ids[i, width - len(r):] = torch.tensor(list(r))
            mask[i, width - len(r):] = 1
    return ids, mask


def answer_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                prefix: torch.Tensor | None = None, average: str = "token"):
    """Next-token cross-entropy over the labelled positions, averaged over all of them
    (``average="token"``) or over each sample's own positions and then over the samples
    that have any (``"sample"``); the LM head is applied to those positions only when the
    model allows it. ``prefix`` ``(B, P, d)``: embeddings prepended to the inputs (attended
    to, not scored). Returns (loss, n_tokens)."""
    target = labels[:, 1:]
    keep = target != IGNORE
    n = int(keep.sum())
    if n == 0:
        raise ValueError("a training batch has no answer tokens (all answers truncated away?)")
    inputs: dict = {"input_ids": input_ids, "attention_mask": attention_mask}
    skip = 0
    if prefix is not None:
        embeds = model.get_input_embeddings()(input_ids)
        skip = prefix.shape[1]
        inputs = {"inputs_embeds": torch.cat([prefix.to(embeds.dtype), embeds], 1),
                  "attention_mask": torch.cat([attention_mask.new_ones(attention_mask.shape[0], skip), attention_mask], 1)}
    head = model.get_output_embeddings()
    decoder = getattr(model, "base_model", None)
    plain_head = (head is not None and decoder is not None and decoder is not model
                  and getattr(model.config, "final_logit_softcapping", None) is None
                  and float(getattr(model.config, "logit_scale", 1.0) or 1.0) == 1.0)
    if plain_head:
        hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, skip:]
        logits = head(hidden[:, :-1][keep])
    else:
        logits = model(**inputs, use_cache=False).logits[:, skip:][:, :-1][keep]
    if average == "token":
        return F.cross_entropy(logits.float(), target[keep]), n
    per_token = F.cross_entropy(logits.float(), target[keep], reduction="none")
    counts = keep.sum(1)
    rows = keep.nonzero()[:, 0]  # row of each labelled position, in the order of ``keep``
    weights = 1.0 / (counts[rows].to(per_token.dtype) * int((counts > 0).sum()))
    return (per_token * weights).sum(), n


class TextProtocol:
    """Answer-only LM loss and generation-based scores for text streams (see module doc)."""

    def __init__(self, module):
        self.m = module  # a plain reference: the protocol owns no parameters
        self.settings = text_settings(None, **{k: v for k, v in module.stream.settings.items() if k in TEXT_DEFAULTS})
        bb = module.backbone
        self.tokenizer = bb.tokenizer
        self.pad_id = int(self.tokenizer.pad_token_id)
        eos = bb.eos_token_ids if hasattr(bb, "eos_token_ids") else [self.tokenizer.eos_token_id]
        self.encoder = PromptEncoder(self.tokenizer, self.settings, eos)
        for t in module.stream.tasks:
            text_scorers.get_scorer(t.scorer)  # fail early on a typo

    @property
    def model(self):
        return self.m.backbone.model

    @staticmethod
    def batch_size(batch: dict) -> int:
        return len(batch["prompt"])

    # ---- training ---------------------------------------------------------------------
    def prefix(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
        """The method's input prefix for these (left-padded) prompts, or None, and its
        auxiliary outputs (see module doc)."""
        return self.m.text_prefix(prompt_ids, prompt_mask)

    def side(self, task: int) -> str:
        """The prompt truncation side of task ``task`` (``task_truncation`` / ``truncation``)."""
        return self.encoder.side(self.m.stream.tasks[task].name)

    def loss(self, batch: dict, task: int) -> tuple[torch.Tensor, dict]:
        side = self.side(task)
        ids, mask, labels = training_batch(self.encoder, batch["prompt"], batch["answer"], self.pad_id, side)
        dev = self.m.device
        p_ids, p_mask = generation_batch([self.encoder.prompt_ids(p, side) for p in batch["prompt"]], self.pad_id)
        prefix, aux = self.prefix(p_ids.to(dev), p_mask.to(dev))
        loss, n = answer_loss(self.model, ids.to(dev), mask.to(dev), labels.to(dev), prefix,
                              average=self.settings["loss_average"])
        return loss, {**aux, "answer_tokens": n, "input_ids": ids, "attention_mask": mask, "prefix": prefix}

    # ---- evaluation -------------------------------------------------------------------
    def on_eval_start(self) -> None:
        pass

    def on_eval_end(self) -> None:
        pass

    def _generation_config(self, max_new_tokens: int):
        from transformers import GenerationConfig

        s = self.settings
        return GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1,
                                repetition_penalty=float(s["repetition_penalty"]),
                                no_repeat_ngram_size=int(s["no_repeat_ngram_size"]),
                                eos_token_id=self.encoder.stop_ids, pad_token_id=self.pad_id,
                                use_cache=True)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int, side: str | None = None) -> list[str]:
        """Greedy answers to ``prompts`` (batched, left-padded, sorted by length; prompts
        truncated on ``side``, default the stream's ``truncation``)."""
        encoded = [self.encoder.prompt_ids(p, side) for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        chunk = max(1, int(self.settings["gen_batch_size"]))
        gen_cfg = self._generation_config(max_new_tokens)
        out: list[str] = [""] * len(prompts)
        dev = self.m.device
        for s in range(0, len(order), chunk):
            idx = order[s:s + chunk]
            ids, mask = generation_batch([encoded[i] for i in idx], self.pad_id)
            ids, mask = ids.to(dev), mask.to(dev)
            prefix, _ = self.prefix(ids, mask)
            if prefix is None:
                seq = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
                new = seq[:, ids.shape[1]:].cpu()
            else:  # generation from embeddings returns the new tokens only
                embeds = self.model.get_input_embeddings()(ids)
                embeds = torch.cat([prefix.to(embeds.dtype), embeds], 1)
                mask = torch.cat([mask.new_ones(mask.shape[0], prefix.shape[1]), mask], 1)
                new = self.model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=gen_cfg).cpu()
            for i, row in zip(idx, new):
                out[i] = self.tokenizer.decode(row, skip_special_tokens=True).strip()
        return out

    def scores(self, batch: dict, task: int) -> torch.Tensor:
        t = self.m.stream.tasks[task]
        preds = self.generate(batch["prompt"], t.max_new_tokens, self.side(task))
        vals = text_scorers.score(t.scorer, preds, batch["answer"], batch["prompt"])
        return torch.tensor(vals, dtype=torch.float64)
