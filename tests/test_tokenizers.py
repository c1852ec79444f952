"""tinybooth.text tokenizers against transformers' T5Tokenizer / CLIPTokenizer on ~300 strings (punctuation, digits,
accents, CJK, emoji, whitespace, over-long text), from tests/fixtures/text/tokenizers.json."""
import json
from pathlib import Path

import pytest
import torch

from tinybooth.text import T5Tokenizer, pad_and_truncate
from tinybooth.clip import CLIPTokenizer, clip_vocab_from_gz

TEXT = Path(__file__).parent / "fixtures" / "text"
CLIP_ASSETS = Path(__file__).parent.parent / "tinybooth" / "assets" / "clip"


@pytest.fixture(scope="module")
def ref():
    return json.loads((TEXT / "tokenizers.json").read_text(encoding="utf-8"))


def assert_same_ids(got, want, strings, name):
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, transformers gives {tuple(want.shape)}"
    bad = [i for i in range(len(want)) if not torch.equal(got[i], want[i])]
    if bad:
        i = bad[0]
        n = int((want[i] != want[i, -1]).sum()) + 2
        raise AssertionError(f"{name}: {len(bad)} of {len(want)} strings tokenise differently; first {strings[i]!r}:\n"
                             f"  transformers {want[i, :n].tolist()}\n  tinybooth    {got[i, :n].tolist()}")


@pytest.mark.task4_4
def test_pad_and_truncate_keeps_the_end_token():
    ids, mask = pad_and_truncate([[5, 6, 7, 8, 9], [5]], max_length=4, bos=None, eos=1, pad=0)
    assert ids.tolist() == [[5, 6, 7, 1], [5, 1, 0, 0]], "T5: tokens cut to max_length - 1, then </s>, then pads"
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]], "mask is 1 on the tokens and </s>, 0 on padding"
    ids, mask = pad_and_truncate([[5, 6, 7, 8]], max_length=4, bos=49406, eos=49407, pad=49407)
    assert ids.tolist() == [[49406, 5, 6, 49407]], "CLIP: <|startoftext|>, tokens cut to max_length - 2, <|endoftext|>"
    assert ids.dtype == torch.long and mask.dtype == torch.long


@pytest.mark.task4_4
def test_t5_ids_match_transformers(ref, t5):
    """Equal ids, except on exact Viterbi ties ("000" = "0" + "00" = "00" + "0", same score), which transformers'
    tokenizers-based unigram breaks differently from the sentencepiece library: there we must equal sentencepiece."""
    ids, mask = t5(ref["strings"], max_length=ref["max_length"])
    want = [ref["t5"]["sentencepiece_ties"].get(str(i), hf) for i, hf in enumerate(ref["t5"]["input_ids"])]
    assert len(ref["t5"]["sentencepiece_ties"]) <= 2, "ties should be rare; more means the fixture changed"
    assert_same_ids(ids, want, ref["strings"], "T5Tokenizer")
    assert mask.tolist() == ref["t5"]["attention_mask"], "T5 attention masks differ from transformers'"
    short, _ = t5(ref["strings"][:40], max_length=ref["t5_short"]["max_length"])
    assert_same_ids(short, ref["t5_short"]["input_ids"], ref["strings"], "T5Tokenizer truncated to 12")


def test_t5_vocabulary_and_sentinels(ref, t5):
    assert t5.vocab_size == len(t5) == ref["t5"]["vocab_size"] == 11100, "11000 pieces + 100 <extra_id_i>"
    assert t5.decode([ref["t5"]["extra_id_0"]]) == "<extra_id_0>", "<extra_id_0> is the LAST id (reverse order)"
    assert t5.decode([ref["t5"]["extra_id_99"]]) == "<extra_id_99>", "<extra_id_99> is the first id after the pieces"
    assert (t5.pad_id, t5.eos_id) == (0, 1)


def test_t5_decode_matches_transformers(ref, t5):
    want = ref["t5"]["decoded"]
    got = [t5.decode(ids) for ids in ref["t5"]["input_ids"][:len(want)]]
    bad = [(g, w) for g, w in zip(got, want) if g != w]
    assert not bad, f"decode differs from transformers (skip_special_tokens=True) on {len(bad)} strings: {bad[:3]}"


@pytest.fixture(scope="module")
def real():
    """Ids of transformers on the real vocabularies (tests/reference/make_real_vocab_fixtures.py)."""
    return json.loads((TEXT / "real_vocab.json").read_text(encoding="utf-8"))


@pytest.mark.task4_4
def test_clip_ids_match_transformers(ref, real, clip):
    """tokenizers.json was made without ftfy; the strings ftfy changes are checked against ftfy's ids below."""
    fixed = dict(zip(real["clip"]["strings"], real["clip"]["fixed"]))
    keep = [i for i, s in enumerate(ref["strings"]) if fixed[s] == s]
    assert len(keep) >= len(ref["strings"]) - 3, "only ligatures, full-width and curly quotes are ftfy's to fix"
    strings = [ref["strings"][i] for i in keep]
    ids, mask = clip(strings, max_length=ref["max_length"])
    assert_same_ids(ids, [ref["clip"]["input_ids"][i] for i in keep], strings, "CLIPTokenizer (bpe_simple_vocab_16e6)")
    assert mask.tolist() == [ref["clip"]["attention_mask"][i] for i in keep], "CLIP attention masks differ"


def test_clip_folds_text_like_ftfy(real, clip):
    """transformers' CLIPTokenizer runs ftfy.fix_text first (as CLIP does): full-width 'ＦＵＬＬ' becomes 'FULL',
    'ﬁ' becomes 'fi', curly quotes straight. tinybooth applies the same tables without the ftfy dependency."""
    bad = [(s, clip.tokenize(s), want) for s, want in zip(real["clip"]["strings"], real["clip"]["ids"])
           if clip.tokenize(s) != want]
    assert not bad, (f"{len(bad)} strings tokenise unlike transformers + ftfy {real['meta']['ftfy']}; first "
                     f"{bad[0][0]!r}: tinybooth {bad[0][1]}, transformers {bad[0][2]}: see FTFY_TABLE in text.py")
    assert clip.tokenize("ＦＵＬＬ") == clip.tokenize("full"), "full-width letters are folded to ASCII"


def test_t5_ids_match_transformers_slow_and_fast_on_the_real_vocabulary(real):
    """The real T5 v1.1 spiece.model (32000 pieces + 100 sentinels): tinybooth equals transformers' slow
    (sentencepiece) tokenizer on all ~1400 strings (prompts, "a [V] dog" for every short text of ids 5000-9999,
    German/French/Romanian) and the fast one except on exact Viterbi ties ('soooooo'), where slow and fast differ."""
    t5 = T5Tokenizer.from_pretrained(TEXT / "t5_v1_1_real")
    assert len(t5) == real["t5"]["vocab_size"] == 32100
    ours = [t5.tokenize(s) + [t5.eos_id] for s in real["t5"]["strings"]]
    slow_bad = [s for s, a, b in zip(real["t5"]["strings"], ours, real["t5"]["slow"]) if a != b]
    assert not slow_bad, f"{len(slow_bad)} strings differ from transformers' slow T5Tokenizer, first {slow_bad[0]!r}"
    fast_bad = [i for i, (a, b) in enumerate(zip(ours, real["t5"]["fast"])) if a != b]
    ties = [i for i, (a, b) in enumerate(zip(real["t5"]["slow"], real["t5"]["fast"])) if a != b]
    assert fast_bad == ties and len(ties) <= 2, (f"differences from the fast tokenizer must be the slow/fast ties "
                                                 f"{ties}, got {fast_bad}")


def test_clip_vocabulary_from_the_gz(ref, clip):
    vocab, merges = clip_vocab_from_gz(CLIP_ASSETS / "bpe_simple_vocab_16e6.txt.gz")
    assert len(vocab) == clip.vocab_size == ref["clip"]["vocab_size"] == 49408 and len(merges) == 48894
    assert (vocab["!"], vocab["a</w>"], vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (0, 320, 49406, 49407)
    assert clip.tokenize("sks") == ref["clip"]["sks"] == [48136], "'sks' is the single CLIP token 48136"
    assert clip.pad_id == 49407, "SD 1.x pads with <|endoftext|> = 49407"


@pytest.mark.task4_4
def test_clip_from_vocab_json_and_merges_with_pad_from_config(ref):
    """SD 2.x-style tokenizer dir (vocab.json + merges.txt, pad_token '!'). transformers registers the pad token
    '!' as a special token and so reads a lone '!' in text as that token (id 0 rather than the BPE token '!</w>');
    CLIP does not, nor do we: those strings are left out."""
    small = CLIPTokenizer.from_pretrained(TEXT / "clip_small")
    assert small.pad_id == ref["clip_small"]["pad_id"] == 0
    assert small.vocab_size == ref["clip_small"]["vocab_size"]
    keep = [i for i, s in enumerate(ref["strings"][:80]) if "!" not in s]
    ids, mask = small([ref["strings"][i] for i in keep])
    assert_same_ids(ids, [ref["clip_small"]["input_ids"][i] for i in keep], [ref["strings"][i] for i in keep],
                    "CLIPTokenizer (2000 merges)")
    assert mask.tolist() == [ref["clip_small"]["attention_mask"][i] for i in keep]


@pytest.mark.task4_4
def test_clip_from_transformers_tokenizer_json(ref):
    """transformers >= 5 saves a CLIPTokenizer as tokenizer.json (vocab and merges inside): the same ids."""
    a = CLIPTokenizer.from_pretrained(TEXT / "clip_small")
    b = CLIPTokenizer.from_pretrained(TEXT / "clip_small_tokenizer_json")
    assert (a.vocab_size, a.pad_id) == (b.vocab_size, b.pad_id)
    assert torch.equal(a(ref["strings"])[0], b(ref["strings"])[0])


@pytest.mark.task4_4
def test_clip_cleans_text_like_clip(clip):
    """CLIP's basic_clean (html.unescape twice) and whitespace_clean, lower-case (ftfy's tables: test above)."""
    same = clip.tokenize("fish & chips")
    assert clip.tokenize("Fish &amp;amp; CHIPS") == same, "HTML entities are unescaped (twice), text lower-cased"
    assert clip.tokenize("  fish\t&\n chips ") == same, "runs of whitespace are one space"
    assert clip.decode(clip("A photo of a SKS dog!")[0][0]) == "a photo of a sks dog !"


@pytest.mark.task4_4
def test_single_string_and_default_length(t5, clip):
    for tok in (t5, clip):
        ids, mask = tok("a photo of a dog")
        assert ids.shape == mask.shape == (1, 77), f"{type(tok).__name__}: default max_length is 77"
