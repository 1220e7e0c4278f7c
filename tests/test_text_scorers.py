"""Scorers of the LLM track on known input/output pairs (values worked out by hand)."""
import pytest

from moram_bench import text_scorers as S


def test_exact_match_normalises_case_punctuation_and_spaces():
    assert S.score("exact_match", ["  Sci/Tech. ", "World", "sports news"], ["sci tech", "world!", "sports"]) == [
        100.0, 100.0, 0.0]
    assert S.score("accuracy", ["Animal."], ["animal"]) == [100.0]  # alias


@pytest.mark.parametrize("pred, want", [
    ("B", "B"), ("(C) neutral", "C"), ("A. dovish", "A"), ("The answer is D.", "D"),
    ("Answer: B", "B"), ("none of them", None), ("Bdovish", None),
])
def test_option_letter_extraction(pred, want):
    assert S.extract_option_letter(pred) == want


def test_option_letter_and_first_char_scores():
    assert S.score("option_letter", ["(B) hawkish", "It is C", "nothing", "A"], ["B", "C", "A", "B"]) == [
        100.0, 100.0, 0.0, 0.0]
    # TRACE scores ScienceQA by the first character only
    assert S.score("first_char", ["b. because", "  C", "", "D"], ["B", "C", "A", "A"]) == [100.0, 100.0, 0.0, 0.0]


def test_numeric_answers():
    assert S.extract_number("about 1,200 apples and 3 pears") == 1200.0
    assert S.extract_number("it is -3.50 degrees") == -3.5
    assert S.extract_number("no digits") is None
    preds = ["17", "The answer is 12.", "12.0", "3 + 4 = 7", "x"]
    refs = ["17", "12", "12", "7", "5"]
    # the first number counts: "3 + 4 = 7" answers 3
    assert S.score("numeric", preds, refs) == [100.0, 100.0, 100.0, 0.0, 0.0]
    # a reference without a number falls back to exact match
    assert S.score("numeric", ["yes"], ["Yes."]) == [100.0]


def test_rouge_l_f_measure():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 tokens:
    # P = 5/6, R = 5/6, F = 5/6
    # LCS("a b c d", "a c e") = "a c": P = 2/4, R = 2/3, F = 2 PR / (P + R) = 4/7
    got = S.score("rouge_l", ["The cat sat on the mat.", "a b c d", "", ""], ["the cat is on the mat", "a c e", "x", ""])
    assert got == pytest.approx([500 / 6, 400 / 7, 0.0, 100.0], abs=1e-4)
    # Unicode words survive tokenisation (German, 20Minuten-style text)
    assert S.score("rouge_l", ["Die Straße ist nass"], ["die straße ist nass"]) == pytest.approx([100.0], abs=1e-4)


def test_edit_similarity():
    # Levenshtein("kitten", "sitting") = 3, longer string 7 characters
    assert S.score("edit_sim", ["kitten", "same", "", ""], ["sitting", "same", "abc", ""]) == pytest.approx(
        [100 * (1 - 3 / 7), 100.0, 0.0, 100.0])


def test_py150_literal_placeholders_are_restored():
    code = '<s> print ( <STR_LIT:hello> ) <EOL> x = <NUM_LIT> + <NUM_LIT:3> <EOL> y = <STR_LIT> </s>'
    assert S.restore_code_literals(code) == 'print ( hello ) \n x = 0 + 3 \n y ='
    # the reference is one line: only the prediction's first line is compared
    pred = "self . assertEqual ( x , <NUM_LIT:1> ) <EOL> return"
    ref = "self . assertEqual ( x , 1 )"
    assert S.score("code_edit_sim", [pred], [ref]) == [100.0]
    # one character substituted out of 28
    assert S.score("code_edit_sim", ["self . assertEqual ( x , 2 )"], [ref]) == pytest.approx([100 * (1 - 1 / 28)])


def test_sari_worked_example_single_reference():
    """Worked by hand from the SARI definition (Xu et al. 2016), one reference (k = 1).

    source "the quick brown fox", output "the fox", reference "the brown fox".
    n=1  keep: kept {the, fox}, both in the reference -> P = 1; src&ref {the, brown, fox}
               -> R = 2/3; F = 0.8.  delete: {quick, brown}, only quick is deleted in the
               reference -> P = 1/2.  add: nothing added, nothing to add -> F = 1 (0/0 = 1).
    n=2  keep: nothing kept -> P = 1, src&ref {brown fox} not kept -> R = 0, F = 0.
         delete: {the quick, quick brown, brown fox}, brown fox is in the ref -> P = 2/3.
         add: {the fox} is not in the reference -> P = 0, R = 0 ({the brown} missed), F = 0.
    n=3  keep: F = 1 (0/0). delete: both source trigrams gone from the ref -> P = 1.
         add: nothing added (P = 1) but "the brown fox" missed (R = 0) -> F = 0.
    n=4  keep F = 1, delete P = 1, add F = 1.
    keep = (0.8 + 0 + 1 + 1) / 4 = 70; delete = (1/2 + 2/3 + 1 + 1) / 4 = 79.1667;
    add = (1 + 0 + 0 + 1) / 4 = 50; SARI = (70 + 79.1667 + 50) / 3 = 66.3889.
    """
    total, keep, dele, add = S.sari("the quick brown fox", "the fox", ["the brown fox"], components=True)
    assert keep == pytest.approx(70.0)
    assert dele == pytest.approx(100 * (0.5 + 2 / 3 + 2) / 4)
    assert add == pytest.approx(50.0)
    assert total == pytest.approx((70.0 + 100 * (0.5 + 2 / 3 + 2) / 4 + 50.0) / 3)


def test_sari_paper_example_three_references():
    """The example of Xu et al. (2016): source "About 95 species are currently accepted.",
    references "About 95 species are currently known.", "About 95 species are now accepted.",
    "95 species are now accepted.", output "About 95 you now get in.".

    Unigrams (counts x 3 references): kept {about, 95, .}; reference counts about 2, 95 3,
    . 3 -> keep P = (2/3 + 1 + 1) / 3 = 8/9, keep R = (2 + 3 + 3) / 17 = 8/17 (17 = summed
    min(source, reference) counts) -> F = 8/13. Deleted {species, are, currently, accepted}
    (3 each) against reference counts 3, 3, 1, 2 -> P = (0 + 0 + 2/3 + 1/3) / 4 = 1/4.
    Added {you, now, get, in}: only "now" is in a reference; references add {known, now}
    -> P = 1/4, R = 1/2, F = 1/3. Bigrams: keep F = 2/7 ({about 95}: P = 2/3, R = 2/11),
    delete P = 2/5, add F = 0; trigrams: keep 0, delete 3/5, add 0; 4-grams: keep 0,
    delete 3/4, add 0. keep = (8/13 + 2/7) / 4, delete = 1/2, add = 1/12; the published
    value of this example in the Hugging Face ``evaluate`` SARI card is 26.9536
    (keep 22.5275, delete 50.0, add 8.3333).
    """
    refs = ["About 95 species are currently known.", "About 95 species are now accepted.",
            "95 species are now accepted."]
    total, keep, dele, add = S.sari("About 95 species are currently accepted.", "About 95 you now get in.", refs,
                                    components=True)
    assert keep == pytest.approx(100 * (8 / 13 + 2 / 7) / 4)
    assert dele == pytest.approx(50.0)
    assert add == pytest.approx(100 / 12)
    assert total == pytest.approx(26.953601953601954)


def test_sari_scorer_uses_the_prompt_as_source_and_rewards_the_reference():
    src = "Shorten: a b c d"
    assert S.score("sari", ["a b"], ["a b"], ["a b c d"]) == [100.0]
    copied = S.score("sari", [src], ["a b"], [src])[0]
    assert 0.0 < copied < S.score("sari", ["a b"], ["a b"], [src])[0]


def test_unknown_scorer_and_length_mismatch():
    with pytest.raises(KeyError, match="unknown scorer 'bleu'"):
        S.score("bleu", ["a"], ["a"])
    with pytest.raises(ValueError):
        S.score("exact_match", ["a", "b"], ["a"])
