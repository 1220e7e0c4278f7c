"""Per-sample scorers of generated answers (LLM track), all on a 0-100 scale, all offline.

A scorer is ``fn(predictions, references, sources) -> list[float]`` (one score per sample);
``sources`` are the prompts (only SARI uses them). A task names its scorer (``Task.scorer``);
``score(name, ...)`` looks it up in ``SCORERS``. The accuracy matrix averages the per-sample
scores of a task (so ROUGE-L and SARI are sentence-level scores averaged over the test set).

| name | what it computes |
|---|---|
| ``exact_match`` (alias ``accuracy``) | 100 if prediction and reference are equal after ``normalize_answer`` (lower case, punctuation removed, whitespace collapsed): O-LoRA's metric |
| ``option_letter`` | 100 if the first option letter (A-H) found in the prediction equals the reference's (C-STANCE, FOMC) |
| ``first_char`` | 100 if the prediction's first non-space character equals the reference's, case-insensitive (ScienceQA, as TRACE scores it) |
| ``numeric`` | 100 if the first number in the prediction equals the reference's number (NumGLUE) |
| ``rouge_l`` | ROUGE-L F-measure x 100 (torchmetrics ``rouge_score``, Unicode word tokens, no stemming: no nltk) |
| ``edit_sim`` | ``100 * (1 - Levenshtein(pred, ref) / max(len(pred), len(ref)))`` on characters (torchmetrics ``edit_distance``) |
| ``code_edit_sim`` | ``edit_sim`` after restoring the literal placeholders of the CodeXGLUE/TRACE Py150 data in both strings (``restore_code_literals``) and keeping the prediction's first line when the reference is one line (Py150) |
| ``sari`` | SARI (Xu et al. 2016) with the prompt as source, one reference (20Minuten); see ``sari`` |

Conventions: an empty prediction scores 0 unless the reference is empty too (then 100).
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Callable, Sequence

ScorerFn = Callable[[Sequence[str], Sequence[str], Sequence[str]], list[float]]
SCORERS: dict[str, ScorerFn] = {}


def register_scorer(*names: str):
    def deco(fn: ScorerFn) -> ScorerFn:
        for n in names:
            SCORERS[n] = fn
        return fn

    return deco


def get_scorer(name: str) -> ScorerFn:
    if name not in SCORERS:
        raise KeyError(f"unknown scorer {name!r}; valid choices: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]


def score(name: str, predictions: Sequence[str], references: Sequence[str],
          sources: Sequence[str] | None = None) -> list[float]:
    """Per-sample scores (0-100) of ``predictions`` against ``references`` with scorer ``name``."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    sources = list(sources) if sources is not None else [""] * len(predictions)
    return [float(v) for v in get_scorer(name)(list(predictions), list(references), sources)]


# ---------------------------------------------------------------------------------------
# accuracy-style scorers
# ---------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """Lower case, drop every Unicode punctuation character, collapse whitespace."""
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text.lower())
    return " ".join(text.split())


@register_scorer("exact_match", "accuracy")
def exact_match(preds, refs, sources=None) -> list[float]:
    """100 when ``normalize_answer(pred) == normalize_answer(ref)``, else 0."""
    return [100.0 if normalize_answer(p) == normalize_answer(r) else 0.0 for p, r in zip(preds, refs)]


OPTION_LETTERS = "ABCDEFGH"
_LEADING_OPTION = re.compile(r"^\W{0,3}([A-H])(?![A-Za-z])")
_ANY_OPTION = re.compile(r"(?<![A-Za-z])([A-H])(?![A-Za-z])")


def extract_option_letter(text: str) -> str | None:
    """The option letter a generated answer chooses, or None.

    A letter A-H at the very start (optionally after "(" or similar: "B", "(B)", "B. hawkish")
    wins; otherwise the first standalone capital A-H anywhere ("The answer is C"). A word
    such as "A" used as an article can be mistaken for an option: models trained on the
    task answer with the letter first, which the first rule catches.
    """
    m = _LEADING_OPTION.match(text.strip())
    if m:
        return m.group(1)
    m = _ANY_OPTION.search(text)
    return m.group(1) if m else None


@register_scorer("option_letter")
def option_letter(preds, refs, sources=None) -> list[float]:
    """100 when the prediction's option letter equals the reference's."""
    out = []
    for p, r in zip(preds, refs):
        want = extract_option_letter(r)
        got = extract_option_letter(p)
        out.append(100.0 if want is not None and got == want else 0.0)
    return out


@register_scorer("first_char")
def first_char(preds, refs, sources=None) -> list[float]:
    """100 when the first non-space characters agree (case-insensitive)."""
    out = []
    for p, r in zip(preds, refs):
        p, r = p.strip(), r.strip()
        out.append(100.0 if p and r and p[0].upper() == r[0].upper() else 0.0)
    return out


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def extract_number(text: str) -> float | None:
    """The first number in ``text`` (thousands separators allowed: "1,200" -> 1200.0)."""
    m = _NUMBER.search(text)
    if not m:
        return None
    try:
        return float(m.group(0).replace(",", ""))
    except ValueError:  # pragma: no cover - the regex only matches valid numbers
        return None


@register_scorer("numeric")
def numeric(preds, refs, sources=None) -> list[float]:
    """100 when the first number of the prediction equals the reference's (|diff| <= 1e-6
    relative or absolute). A reference without a number falls back to exact match."""
    out = []
    for p, r in zip(preds, refs):
        want = extract_number(r)
        if want is None:
            out.extend(exact_match([p], [r]))
            continue
        got = extract_number(p)
        out.append(100.0 if got is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6) else 0.0)
    return out


# ---------------------------------------------------------------------------------------
# ROUGE-L and edit similarity
# ---------------------------------------------------------------------------------------
def word_tokens(text: str) -> list[str]:
    """Lower-cased Unicode word tokens (punctuation dropped)."""
    return re.findall(r"\w+", text.lower())


@register_scorer("rouge_l")
def rouge_l(preds, refs, sources=None) -> list[float]:
    """ROUGE-L F-measure x 100 per sample (torchmetrics; word tokens from ``word_tokens``)."""
    from torchmetrics.functional.text.rouge import rouge_score

    out = []
    for p, r in zip(preds, refs):
        tp, tr = word_tokens(p), word_tokens(r)
        if not tp or not tr:
            out.append(100.0 if not tp and not tr else 0.0)
            continue
        res = rouge_score(" ".join(tp), " ".join(tr), rouge_keys="rougeL", tokenizer=str.split,
                          normalizer=lambda s: s)
        out.append(100.0 * float(res["rougeL_fmeasure"]))
    return out


@register_scorer("edit_sim")
def edit_sim(preds, refs, sources=None) -> list[float]:
    """``100 * (1 - Levenshtein / max length)`` on characters (100: identical strings)."""
    from torchmetrics.functional.text import edit_distance

    out = [0.0] * len(preds)
    todo = []
    for i, (p, r) in enumerate(zip(preds, refs)):
        if not p or not r:
            out[i] = 100.0 if p == r else 0.0
        else:
            todo.append(i)
    if todo:
        dist = edit_distance([preds[i] for i in todo], [refs[i] for i in todo], reduction="none")
        for i, d in zip(todo, dist.tolist()):
            out[i] = 100.0 * (1.0 - d / max(len(preds[i]), len(refs[i])))
    return out


_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)
_BARE_LITERAL = {"<STR_LIT>": "", "<NUM_LIT>": "0", "<CHAR_LIT>": ""}


def restore_code_literals(code: str) -> str:
    """Undo the literal normalisation of the CodeXGLUE Py150 data used by TRACE.

    ``<STR_LIT:abc>`` / ``<NUM_LIT:42>`` / ``<CHAR_LIT:x>`` become their value, bare
    ``<NUM_LIT>`` becomes ``0`` and bare ``<STR_LIT>`` / ``<CHAR_LIT>`` are removed (as
    CodeXGLUE's line-completion evaluation does); ``<EOL>`` becomes a newline and the
    sequence markers ``<s>`` / ``</s>`` are dropped. The result is stripped.
    """
    code = _LITERAL.sub(lambda m: m.group(2), code)
    for k, v in _BARE_LITERAL.items():
        code = code.replace(k, v)
    code = code.replace("<EOL>", "\n").replace("</s>", "").replace("<s>", "")
    return code.strip()


@register_scorer("code_edit_sim")
def code_edit_sim(preds, refs, sources=None) -> list[float]:
    """Py150 line completion: ``edit_sim`` after ``restore_code_literals``; when the
    reference is a single line only the prediction's first line is compared."""
    p2, r2 = [], []
    for p, r in zip(preds, refs):
        p, r = restore_code_literals(p), restore_code_literals(r)
        if "\n" not in r:
            p = p.split("\n", 1)[0].strip()
        p2.append(p)
        r2.append(r)
    return edit_sim(p2, r2)


# ---------------------------------------------------------------------------------------
# SARI
# ---------------------------------------------------------------------------------------
def sari_tokens(text: str) -> list[str]:
    """Lower-cased words and punctuation marks as separate tokens ("accepted." -> accepted .)."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _ratio(num: float, den: float) -> float:
    """``num / den`` with 0/0 = 1 (nothing to do and nothing done is perfect)."""
    return num / den if den > 0 else 1.0


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def sari_ngram(source: Counter, output: Counter, refs: list[Counter]) -> tuple[float, float, float]:
    """(F_keep, P_del, F_add) of one n-gram order.

    Counts of the source and the output are multiplied by the number of references R and
    compared with the reference counts summed over all references (Xu et al.'s fractional
    reference counts, scaled by R):

    - keep: kept = min(src, out); good = min(kept, ref); precision = mean over kept n-grams
      of good / kept; recall = sum(good) / sum(min(src, ref));
    - delete: deleted = src - out (positive part); good = deleted - ref (positive part);
      precision = mean over deleted n-grams of good / deleted;
    - add: n-gram types in the output but not in the source; precision = share of them that
      occur in a reference; recall = share of the reference types not in the source that
      the output adds.

    0/0 counts as 1 (tensor2tensor / Hugging Face ``evaluate`` conventions, which also
    compute keep recall from counts; Xu's original script used 0/0 = 0 and a per-n-gram
    ratio there).
    """
    k = len(refs)
    src = Counter({g: c * k for g, c in source.items()})
    out = Counter({g: c * k for g, c in output.items()})
    ref = Counter()
    for r in refs:
        ref.update(r)

    kept = src & out
    kept_good = kept & ref
    keep_all = src & ref
    keep_p = _ratio(sum(kept_good[g] / kept[g] for g in kept), len(kept))
    keep_r = _ratio(sum(kept_good.values()), sum(keep_all.values()))

    deleted = src - out
    del_good = deleted - ref
    del_p = _ratio(sum(del_good[g] / deleted[g] for g in deleted), len(deleted))

    added = set(output) - set(source)
    add_all = set(ref) - set(source)
    add_good = added & set(ref)
    add_p = _ratio(len(add_good), len(added))
    add_r = _ratio(len(add_good), len(add_all))
    return _f1(keep_p, keep_r), del_p, _f1(add_p, add_r)


def sari(source: str, prediction: str, references: Sequence[str], max_n: int = 4,
         components: bool = False):
    """Sentence-level SARI x 100: mean of F_keep, P_del and F_add, each averaged over
    n-gram orders 1..``max_n`` (Xu et al. 2016, TACL 4:401-415). Tokens: ``sari_tokens``.

    With ``components=True`` returns ``(sari, keep, delete, add)``, all x 100.
    """
    refs = list(references)
    if not refs:
        raise ValueError("SARI needs at least one reference")
    s, o = sari_tokens(source), sari_tokens(prediction)
    rs = [sari_tokens(r) for r in refs]
    keep = dele = add = 0.0
    for n in range(1, max_n + 1):
        f_keep, p_del, f_add = sari_ngram(_ngrams(s, n), _ngrams(o, n), [_ngrams(r, n) for r in rs])
        keep += f_keep
        dele += p_del
        add += f_add
    keep, dele, add = (100.0 * v / max_n for v in (keep, dele, add))
    total = (keep + dele + add) / 3
    return (total, keep, dele, add) if components else total


@register_scorer("sari")
def sari_scorer(preds, refs, sources) -> list[float]:
    """SARI per sample with the prompt as the source and the answer as the one reference."""
    return [sari(s, p, [r]) for p, r, s in zip(preds, refs, sources)]
