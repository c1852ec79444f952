"""tinybooth.rare_tokens: the paper's rare-token identifier search (Sec. 4.1) on the fixture SentencePiece model
(11000 pieces, like the toy model's ~12000) and on CLIP's real BPE vocabulary."""
from pathlib import Path

import pytest

from tinybooth import rare_tokens
from tinybooth.rare_tokens import count_tokens, find_rare_identifier, is_identifier_text, rare_token_candidates

TEXT = Path(__file__).parent / "fixtures" / "text"


def test_identifier_text_filter():
    assert is_identifier_text("sks") and is_identifier_text("é") and is_identifier_text("東京")
    for bad in ("", "abcd", "a b", "''", "...", "12", "a\ufffd", "a\n"):
        assert not is_identifier_text(bad), f"{bad!r} must not be an identifier"
    assert is_identifier_text("abcd", max_chars=4)


@pytest.mark.task5_1
@pytest.mark.parametrize("name", ["t5", "clip"])
def test_candidates_are_the_short_texts_of_the_range_in_random_order(request, name):
    tok = request.getfixturevalue(name)
    lo, hi = 5000, 5600
    cands = rare_token_candidates(tok, (lo, hi), seed=0)
    texts = {tok.decode([i]).strip() for i in range(lo, hi)}
    expected = {t for t in texts if is_identifier_text(t)}
    assert set(cands) == expected, (f"{name}: the candidates must be exactly the de-tokenised texts of ids "
                                    f"{lo}..{hi - 1} with <= 3 characters and no space; missing "
                                    f"{sorted(expected - set(cands))[:5]}, extra {sorted(set(cands) - expected)[:5]}")
    assert len(cands) == len(set(cands)) > 20, "each text once"
    assert not any("</w>" in c or "\u2581" in c for c in cands), "word marks (</w>, ▁) are stripped"
    assert cands == rare_token_candidates(tok, (lo, hi), seed=0), "the same seed gives the same order"
    assert cands != rare_token_candidates(tok, (lo, hi), seed=1), "another seed gives another order"
    in_id_order = list(dict.fromkeys(t for t in (tok.decode([i]).strip() for i in range(lo, hi)) if t in expected))
    assert cands != in_id_order, "ids are sampled in random order, not scanned from lo upwards"


@pytest.mark.task5_1
def test_first_candidate_is_uniform_over_the_range(t5):
    """Sampling without replacement, uniformly: over many seeds the first candidate is not always the same, nor the
    lowest id of the range."""
    firsts = {rare_token_candidates(t5, (5000, 10000), seed=s)[0] for s in range(20)}
    assert len(firsts) >= 8, f"20 seeds gave only {len(firsts)} distinct first candidates: not a random order"


@pytest.mark.task5_1
@pytest.mark.task5_2
@pytest.mark.parametrize("name", ["t5", "clip"])
def test_find_rare_identifier_paper_range(request, name):
    tok = request.getfixturevalue(name)
    cands = rare_token_candidates(tok, (5000, 10000), seed=3)
    for k in (1, 2, 3):
        ident = find_rare_identifier(tok, k=k, seed=3)
        assert ident == "".join(cands[:k]), f"k={k}: the first {k} candidates joined, expected {''.join(cands[:k])!r}"
        assert 1 <= len(ident) <= 3 * k and " " not in ident
    assert find_rare_identifier(tok, seed=3) == find_rare_identifier(tok, seed=3), "reproducible from the seed"


@pytest.mark.parametrize("bad", [(5000, 20000), (-1, 100), (300, 300), (11100, 11150)])
def test_ranges_outside_the_vocabulary_are_refused(t5, bad):
    with pytest.raises(ValueError, match="11000 pieces"):
        rare_token_candidates(t5, bad)


def test_k_must_be_positive(t5):
    with pytest.raises(ValueError, match="k=0"):
        find_rare_identifier(t5, k=0)


@pytest.mark.task5_1
@pytest.mark.task5_2
def test_count_tokens(t5, clip):
    assert count_tokens(clip, "sks") == 1, "'sks' is one CLIP token (48136), the identifier most SD users know"
    assert count_tokens(clip, "sks dog") == 2
    assert count_tokens(t5, "sks") == len(t5.sp.encode("sks"))
    ident = find_rare_identifier(clip, seed=0)
    assert count_tokens(clip, ident) == 1, f"a single rare CLIP token {ident!r} should stay one token"


@pytest.mark.task5_1
@pytest.mark.task5_2
def test_cli(capsys, t5):
    rare_tokens.main(["--tokenizer", str(TEXT / "spm"), "--k", "2", "--seed", "4", "--range", "6000", "9000"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == find_rare_identifier(t5, k=2, id_range=(6000, 9000), seed=4)
    assert "token(s)" in out[1]
    with pytest.raises(SystemExit) as e:
        rare_tokens.main(["--tokenizer", str(TEXT)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and "holds no tokenizer" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------------------------
# the search on the real T5 v1.1 vocabulary (DeepFloyd IF's tokenizer; tests/fixtures/text/t5_v1_1_real, Apache-2.0)

@pytest.fixture(scope="module")
def t5_real():
    from tinybooth.text import T5Tokenizer
    return T5Tokenizer.from_pretrained(TEXT / "t5_v1_1_real")


def test_find_identifier_on_the_real_t5_vocabulary(t5_real):
    """Sec. 4.1 on T5-XXL's own vocabulary: [V] is ONE token of ids 5000-9999 inside a prompt, decodes to <= 3
    lower-case ASCII letters, and is no word of English (the prompt language) nor German/French/Romanian."""
    before, after = len(t5_real.tokenize("a")), len(t5_real.tokenize("dog"))
    for seed in range(6):
        ident = rare_tokens.find_identifier(t5_real, seed=seed)
        ids = t5_real.tokenize(f"a {ident} dog")[before:-after]
        assert len(ids) == 1, f"seed {seed}: {ident!r} is {len(ids)} tokens in 'a {ident} dog', must be one"
        assert 5000 <= ids[0] < 10000, f"seed {seed}: {ident!r} is token {ids[0]}, outside the paper's 5000-9999"
        assert t5_real.decode(ids) == ident and 1 <= len(ident) <= 3, f"seed {seed}: {ident!r} decodes wrongly"
        assert ident.isascii() and ident.isalpha() and ident.islower(), f"seed {seed}: {ident!r} not lower ASCII"
        assert ident not in rare_tokens.common_words(), f"seed {seed}: {ident!r} is a common word"
        assert ident == rare_tokens.find_identifier(t5_real, seed=seed), "the same seed must give the same [V]"
    assert rare_tokens.find_identifier(t5_real, seed=0) == "nec", "seed 0 gave 'nec' when this test was written"
    assert len({rare_tokens.find_identifier(t5_real, seed=s) for s in range(6)}) >= 4, "seeds give varied [V]"


def test_screening_says_why_the_paper_filter_alone_is_not_enough(t5_real):
    """The texts the paper's 3 steps alone yield on the real vocabulary, each refused for its own reason."""
    why = dict(rare_tokens.screen_candidates(t5_real, seed=0))
    expected = {"ddy": "not one token", "Ana": "upper case", "pub": "another token", "öl": "not plain ASCII",
                "cr": "a common word (English)", "cet": "a common word (French)", "hab": "German"}
    for text, reason in expected.items():
        assert why[text] and reason in why[text], f"{text!r} should be refused ({reason}), got {why[text]!r}"
    accepted = [t for t, reason in why.items() if reason is None]
    assert 10 <= len(accepted) <= 60, f"{len(accepted)} of {len(why)} candidates accepted: the filter changed"
    assert rare_tokens.find_identifier(t5_real, seed=0, lower_case=False) in accepted + [t for t in why if
                                                                                       not t.islower()]


def test_find_identifier_refuses_a_range_without_one(t5_real):
    with pytest.raises(ValueError, match="5000..5019"):
        rare_tokens.find_identifier(t5_real, id_range=(5000, 5020))


def test_common_words_list_and_its_licence():
    words = rare_tokens.common_words()
    assert words["dog"] == ("en",) and "de" in words["das"] and "fr" in words["le"], "English/German/French words"
    assert "sks" not in words and all(1 <= len(w) <= 3 and w.isascii() and w.islower() for w in words)
    header = rare_tokens.COMMON_WORDS.read_text(encoding="utf-8")[:3000]
    assert "Kevin Atkinson" in header and "MIT" in header, "the SCOWL and stopwords-iso notices must be kept"


def test_cli_shows_what_was_filtered_and_why(capsys):
    rare_tokens.main(["--tokenizer", str(TEXT / "t5_v1_1_real")])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "nec", "the identifier comes first, alone on its line (scripts read it)"
    assert "'ddy'" in out and "not one token" in out and "a common word" in out and "accepted" in out, out


def test_find_identifier_on_clip(clip):
    ident = rare_tokens.find_identifier(clip, seed=0)
    assert count_tokens(clip, f"a {ident} dog") == 3 and ident.islower() and ident not in rare_tokens.common_words()
