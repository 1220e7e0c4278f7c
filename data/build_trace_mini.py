#!/usr/bin/env python
"""Regenerate ``data/trace_mini/``: the embedded LLM stream (TRACE-style prompt/answer files).

Sources: the WordNet 3.0 database of the Debian ``wordnet-base`` package
(``/usr/share/wordnet/data.noun``, ``data.verb`` and the SemCor sense counts
``cntlist.rev``; WordNet 3.0 licence, notice in ``data/trace_mini/README.md``) and, for the
arithmetic task, nothing: its problems are generated from templates.

Five tasks of different kinds, each with its own scorer (``moram_bench/streams/trace_mini.py``):

================ ============================================================ ==============
task             prompt -> answer                                              scorer
================ ============================================================ ==============
noun-category    noun definition -> one of 8 listed lexicographer categories   exact_match
word-choice      definition -> which of 4 listed words (A-D) it defines        option_letter
arithmetic       easy addition word problem (1-9 plus 1-5) -> the number       numeric
shorten          definition -> the same definition with every parenthesised   sari
                 part and everything after the first semicolon deleted
verb-category    verb definition -> one of 6 listed lexicographer categories   exact_match
================ ============================================================ ==============

Definitions are WordNet glosses without their quoted example sentences. Only synsets with at
least one lemma attested in SemCor (``cntlist.rev``) are used, so rare Latin taxonomy and
obscure senses are left out; word-choice words are single common lowercase words (SemCor
count >= 3 for that sense) that do not occur in their own definition; distractors come from
other lexicographer categories. Every split is balanced across classes / answer letters.

Output: ``data/trace_mini/<task>/train.json`` and ``test.json`` (JSON lists of
``{"prompt", "answer"}``, one record per line) and ``manifest.json`` (counts, sha256 of
every file, build settings). Deterministic (sorted inputs, fixed seeds). From the repository
root::

    python data/build_trace_mini.py            # writes data/trace_mini/
    python data/build_trace_mini.py --check    # rebuild in memory, compare with the files
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from collections import defaultdict
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
OUT = Path(__file__).resolve().parent / "trace_mini"
SEED = 20250611
N_TRAIN, N_TEST = 320, 64

# lexicographer file numbers of WordNet 3.0 (lexnames(5WN)); the Debian package ships no
# lexnames file, so the numbers of the categories used here are listed
NOUN_LEX = {5: "animal", 8: "body", 12: "feeling", 13: "food", 15: "location", 18: "person", 20: "plant", 28: "time"}
VERB_LEX = {32: "communication", 34: "consumption", 35: "contact", 37: "emotion", 38: "motion", 39: "perception"}

NOUN_PROMPT = ("Which category does the following noun definition belong to?\nDefinition: {d}\n"
               "Options: {opts}\nAnswer with one option.")
VERB_PROMPT = ("Which category does the following verb definition belong to?\nDefinition: {d}\n"
               "Options: {opts}\nAnswer with one option.")
CHOICE_PROMPT = "Which word matches the definition?\nDefinition: {d}\n{options}\nAnswer with the letter."
SHORTEN_PROMPT = ("Shorten the definition: delete every part in parentheses and everything after the "
                  "first semicolon.\nDefinition: {d}")
NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kim", "Leo",
         "Maya", "Nora", "Omar", "Paula", "Rosa", "Sam", "Tara", "Yusuf")
OBJECTS = ("apples", "books", "coins", "pencils", "stickers", "marbles", "cards", "stamps", "shells", "cookies",
           "balloons", "buttons")
ARITH_TEMPLATES = (  # one-step additions; SmolLM2-135M subtracts at chance, so none here
    "{n} has {a} {o}. {n} buys {b} more {o}. How many {o} does {n} have now?",
    "There are {a} {o} in a box. {n} puts {b} more {o} in the box. How many {o} are in the box now?",
    "{n} has {a} {o} and finds {b} more. How many {o} does {n} have in total?",
    "{n} has {a} {o} and {m} has {b} {o}. How many {o} do they have together?",
    "{n} gets {a} {o} in the morning and {b} {o} in the afternoon. How many {o} does {n} get in all?",
    "A shelf holds {a} {o}. {n} adds {b} more {o}. How many {o} are on the shelf now?",
)


# ---- WordNet parsing -----------------------------------------------------------------------
def read_synsets(path: Path) -> list[dict]:
    """Synsets of one data.* file: offset, lexicographer file number, lemmas, definition."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            n_words = int(fields[3], 16)
            words = [fields[4 + 2 * i] for i in range(n_words)]
            lex_ids = [int(fields[5 + 2 * i], 16) for i in range(n_words)]
            out.append({"offset": fields[0], "lex": int(fields[1]), "pos": fields[2], "words": words,
                        "lex_ids": lex_ids, "definition": definition_of(gloss)})
    return out


def definition_of(gloss: str) -> str:
    """The gloss without its quoted example sentences and trailing separators."""
    gloss = gloss.strip()
    cut = gloss.find('"')
    if cut >= 0:
        gloss = gloss[:cut]
    return gloss.strip().rstrip(";").strip()


def read_sense_counts(path: Path) -> dict[str, int]:
    """SemCor tag counts by sense key (``cntlist.rev``: "sense_key sense_number tag_count")."""
    counts = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            key, _, cnt = line.split()
            counts[key] = int(cnt)
    return counts


def sense_count(counts: dict[str, int], word: str, pos: str, lex: int, lex_id: int) -> int:
    """SemCor count of one lemma in one synset (sense key ``lemma%ss_type:lex_filenum:lex_id::``)."""
    ss_type = {"n": 1, "v": 2}[pos]
    return counts.get(f"{word.lower()}%{ss_type}:{lex:02d}:{lex_id:02d}::", 0)


def usable(definition: str) -> bool:
    words = definition.split()
    return 3 <= len(words) <= 40 and not re.search(r"[\[\]{}<>]", definition)


def attested(s: dict, counts: dict[str, int]) -> bool:
    return any(sense_count(counts, w, s["pos"], s["lex"], i) > 0 for w, i in zip(s["words"], s["lex_ids"]))


# ---- task builders -------------------------------------------------------------------------
def _shares(n: int, k: int) -> list[int]:
    """``n`` split into ``k`` near-equal parts (the first ones get the remainder)."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def balanced_split(by_class: dict[str, list], rng: random.Random, n_train: int, n_test: int):
    """Disjoint train/test lists of (class, item), each balanced across classes, shuffled."""
    classes = sorted(by_class)
    train, test = [], []
    for c, k_test, k_train in zip(classes, _shares(n_test, len(classes)), _shares(n_train, len(classes))):
        pool = rng.sample(sorted(by_class[c]), len(by_class[c]))
        if len(pool) < k_test + k_train:
            raise SystemExit(f"class {c}: only {len(pool)} usable items, {k_test + k_train} needed")
        test += [(c, x) for x in pool[:k_test]]
        train += [(c, x) for x in pool[k_test:k_test + k_train]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def category_task(synsets, counts, lexmap, template, rng):
    by_class = defaultdict(list)
    seen = set()
    for s in synsets:
        if s["lex"] in lexmap and usable(s["definition"]) and attested(s, counts) and s["definition"] not in seen:
            seen.add(s["definition"])
            by_class[lexmap[s["lex"]]].append(s["definition"])
    opts = ", ".join(sorted(lexmap.values()))
    train, test = balanced_split(by_class, rng, N_TRAIN, N_TEST)
    fmt = lambda pairs: [{"prompt": template.format(d=d, opts=opts), "answer": c} for c, d in pairs]  # noqa: E731
    return fmt(train), fmt(test)


def choice_task(synsets, counts, rng):
    """Definition -> the word it defines, among 4 words; the 3 distractors come from other
    lexicographer categories (same-category distractors left SmolLM2-135M near chance)."""
    candidates = defaultdict(list)  # lex -> [(word, definition, synset words)]
    for s in synsets:
        if not usable(s["definition"]):
            continue
        for w, i in zip(s["words"], s["lex_ids"]):
            if (w.isalpha() and w.islower() and len(w) >= 3 and sense_count(counts, w, "n", s["lex"], i) >= 3
                    and w not in s["definition"].lower()):
                candidates[s["lex"]].append((w, s["definition"], set(s["words"])))
                break
    items = []
    for lex in sorted(candidates):
        others_pool = sorted({w for other, pool in candidates.items() if other != lex for w, _, _ in pool})
        for w, d, syn in candidates[lex]:
            items.append((lex, w, d, [x for x in others_pool if x != w and x not in syn]))
    rng.shuffle(items)
    # one item per word (the most frequent words have several senses), then slot balancing
    chosen, used = [], set()
    for it in items:
        if it[1] not in used:
            used.add(it[1])
            chosen.append(it)
    chosen = chosen[: N_TRAIN + N_TEST]
    if len(chosen) < N_TRAIN + N_TEST:
        raise SystemExit(f"word-choice: only {len(chosen)} usable items")
    out = []
    for k, (lex, w, d, others) in enumerate(chosen):
        slot = k % 4
        options = rng.sample(others, 3)
        options.insert(slot, w)
        letters = "ABCD"
        text = "\n".join(f"{letters[j]}. {o}" for j, o in enumerate(options))
        out.append({"prompt": CHOICE_PROMPT.format(d=d, options=text), "answer": letters[slot]})
    test, train = out[:N_TEST], out[N_TEST:]
    rng.shuffle(train)
    return train, test


def shorten(definition: str) -> str:
    """The deterministic rewrite of the shorten task."""
    text = re.sub(r"\s*\([^()]*\)", "", definition)
    text = text.split(";", 1)[0]
    return " ".join(text.split()).strip().rstrip(",").strip()


def shorten_task(synsets, counts, rng):
    items, seen = [], set()
    for s in synsets:
        d = s["definition"]
        if d in seen or not attested(s, counts) or not ("(" in d or ";" in d):
            continue
        if d.count("(") != d.count(")") or not 8 <= len(d.split()) <= 36:
            continue
        target = shorten(d)
        if target == d or not 4 <= len(target.split()) <= 18:
            continue
        seen.add(d)
        items.append({"prompt": SHORTEN_PROMPT.format(d=d), "answer": target})
    rng.shuffle(items)
    if len(items) < N_TRAIN + N_TEST:
        raise SystemExit(f"shorten: only {len(items)} usable items")
    return items[N_TEST:N_TEST + N_TRAIN], items[:N_TEST]


def arithmetic_task(rng):
    """Easy one-step addition word problems (1-9 plus 1-5); every template equally often."""
    items, seen = [], set()
    k = 0
    while len(items) < N_TRAIN + N_TEST:
        template = ARITH_TEMPLATES[k % len(ARITH_TEMPLATES)]
        k += 1
        a, b = rng.randint(1, 9), rng.randint(1, 5)
        n, m = rng.sample(NAMES, 2)
        prompt = template.format(n=n, m=m, o=rng.choice(OBJECTS), a=a, b=b) + "\nAnswer with a number."
        if prompt in seen:
            continue
        seen.add(prompt)
        items.append({"prompt": prompt, "answer": str(a + b)})
    return items[N_TEST:], items[:N_TEST]


# ---- writing -------------------------------------------------------------------------------
def dumps(records: list[dict]) -> str:
    """A JSON list with one record per line (small diffs, still plain JSON)."""
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False, sort_keys=True) for r in records) + "\n]\n"


def build() -> dict[str, str]:
    """Every output file's relative path -> text."""
    for f in ("data.noun", "data.verb", "cntlist.rev"):
        if not (WORDNET / f).is_file():
            raise SystemExit(f"{WORDNET / f} not found: install the Debian package wordnet-base")
    nouns = read_synsets(WORDNET / "data.noun")
    verbs = read_synsets(WORDNET / "data.verb")
    counts = read_sense_counts(WORDNET / "cntlist.rev")
    tasks = {
        "noun-category": category_task(nouns, counts, NOUN_LEX, NOUN_PROMPT, random.Random(SEED + 1)),
        "word-choice": choice_task(nouns, counts, random.Random(SEED + 2)),
        "arithmetic": arithmetic_task(random.Random(SEED + 3)),
        "shorten": shorten_task(nouns, counts, random.Random(SEED + 4)),
        "verb-category": category_task(verbs, counts, VERB_LEX, VERB_PROMPT, random.Random(SEED + 5)),
    }
    files = {}
    for name, (train, test) in tasks.items():
        files[f"{name}/train.json"] = dumps(train)
        files[f"{name}/test.json"] = dumps(test)
    manifest = {
        "sources": {"wordnet": "WordNet 3.0 (Debian wordnet-base): data.noun, data.verb, cntlist.rev"},
        "seed": SEED, "counts": {n: {"train": len(tr), "test": len(te)} for n, (tr, te) in tasks.items()},
        "noun_categories": sorted(NOUN_LEX.values()), "verb_categories": sorted(VERB_LEX.values()),
        "sha256": {k: hashlib.sha256(v.encode()).hexdigest() for k, v in sorted(files.items())},
    }
    files["manifest.json"] = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="rebuild in memory and compare with data/trace_mini/")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    files = build()
    if args.check:
        bad = [k for k, v in files.items() if not (args.out / k).is_file() or (args.out / k).read_text(encoding="utf-8") != v]
        print("identical" if not bad else f"differs: {', '.join(bad)}")
        return 1 if bad else 0
    for rel, text in files.items():
        path = args.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
