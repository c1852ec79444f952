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
    with pytest.raises(ValueError, match="holds no tokenizer"):
        rare_tokens.main(["--tokenizer", str(TEXT)])
