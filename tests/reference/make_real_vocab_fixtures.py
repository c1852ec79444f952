"""Reference ids on the real vocabularies, for tests/test_tokenizers.py and tests/test_rare_tokens.py.

Run with the reference venv (argument: the folder of the published tokenizer.json, default ../shared/vocab/t5-v1_1):
    /work/refenv/bin/python tests/reference/make_real_vocab_fixtures.py [../shared/vocab/t5-v1_1]
Reads tests/fixtures/text/t5_v1_1_real/spiece.model (the real T5 v1.1 vocabulary, copied with its licence), its
published tokenizer.json from ../shared/vocab/t5-v1_1/ (for the fast tokenizer), the
strings of tests/fixtures/text/tokenizers.json and tinybooth/assets/clip (CLIP's BPE). Writes
tests/fixtures/text/real_vocab.json:
    t5        strings (the ~270 of tokenizers.json, "a {text} dog" for the text of every id 5000-9999 that decodes
              to 1-3 characters, a few German/French/Romanian lines) and the ids transformers' slow T5Tokenizer
              (sentencepiece) and fast T5TokenizerFast (tokenizers) give them, </s> included, no padding
    clip      strings that ftfy.fix_text changes (full-width, half-width katakana, ideographic space, Latin
              ligatures, curly quotes) plus all strings of tokenizers.json; ftfy.fix_text's output; and the ids of
              transformers' CLIPTokenizer, which runs ftfy.fix_text first when ftfy is installed (as here)
    meta      library versions
"""
import json
import sys
from pathlib import Path

import ftfy
import sentencepiece
import tokenizers
import transformers
from transformers import CLIPTokenizer, T5Tokenizer, T5TokenizerFast

sys.path.insert(0, str(Path(__file__).parent))
from make_text_fixtures import clip_merges, write_clip_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT / "tests" / "fixtures" / "text"
REAL = TEXT / "t5_v1_1_real"
SHARED_T5 = ROOT.parent / "shared" / "vocab" / "t5-v1_1"   # or argv[1]; read here only, never by the tests
FTFY_STRINGS = ["ＦＵＬＬ", "ｆｕｌｌｗｉｄｔｈ", "a ｓｋｓ dog", "ＬＯＵＤ　ＮＯＩＳＥＳ", "Ｕﾀｰﾝ", "ｶﾞｷﾞｸﾞ", "１２３！？",
                "ﬁne ﬂuﬃest ﬆ ﬅ", "Ĳssel ǆ", "curly ‘quotes’ “here”", "‛odd‟ quotes ʼ", "a dog ＆ a cat",
                "ﾟ half-width ｡", "mixed ＡＢＣ abc ａｂｃ"]
FOREIGN = ["das ist ein Hund im Schnee", "le chien est dans la neige", "câinele este în zăpadă", "über, naïve, ăîșț"]


def t5_strings(slow):
    base = json.loads((TEXT / "tokenizers.json").read_text(encoding="utf-8"))["strings"]
    texts = [slow.decode([i]).strip() for i in range(5000, 10000)]
    short = sorted({t for t in texts if 1 <= len(t) <= 3 and " " not in t})
    return base + FOREIGN + [f"a {t} dog" for t in short]


def main(shared_t5=SHARED_T5):
    slow = T5Tokenizer(vocab_file=str(REAL / "spiece.model"), extra_ids=100, legacy=True)
    # the fast tokenizer as published beside spiece.model (converting the slow one here would need protobuf)
    fast = T5TokenizerFast(tokenizer_file=str(Path(shared_t5) / "tokenizer.json"), extra_ids=100)
    assert len(fast) == len(slow), f"fast {len(fast)} vs slow {len(slow)} tokens"
    strings = t5_strings(slow)
    t5 = dict(strings=strings, slow=slow(strings)["input_ids"], fast=fast(strings)["input_ids"],
              vocab_size=len(slow))

    clip_dir = TEXT / "clip_full_tmp"
    write_clip_dir(clip_dir, clip_merges(), "<|endoftext|>")
    clip_tok = CLIPTokenizer.from_pretrained(clip_dir)
    assert clip_tok.fix_text is ftfy.fix_text, "transformers must use ftfy here (is ftfy installed?)"
    cstrings = FTFY_STRINGS + json.loads((TEXT / "tokenizers.json").read_text(encoding="utf-8"))["strings"]
    clip = dict(strings=cstrings, fixed=[ftfy.fix_text(s) for s in cstrings],
                ids=clip_tok(cstrings, add_special_tokens=False)["input_ids"])
    for f in clip_dir.iterdir():
        f.unlink()
    clip_dir.rmdir()

    meta = dict(transformers=transformers.__version__, tokenizers=tokenizers.__version__,
                sentencepiece=sentencepiece.__version__, ftfy=ftfy.__version__)
    out = TEXT / "real_vocab.json"
    out.write_text(json.dumps(dict(t5=t5, clip=clip, meta=meta), ensure_ascii=False, separators=(",", ":")),
                   encoding="utf-8")
    print(f"{out}: {out.stat().st_size // 1024} KB, {len(strings)} T5 strings, {len(cstrings)} CLIP strings")


if __name__ == "__main__":
    main(*sys.argv[1:])
