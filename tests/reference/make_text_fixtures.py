"""Reference fixtures for tinybooth/text.py (T5 / CLIP text encoders and tokenizers) and tinybooth/rare_tokens.py.

Run with the reference venv:  /work/refvenv/bin/python tests/reference/make_text_fixtures.py
Writes tests/fixtures/text/:
    t5_gated/            tiny random T5EncoderModel, feed_forward_proj "gated-gelu" (T5 v1.1), one model.safetensors
    t5_gated_sharded/    the same weights saved in shards (model-0000x-of-0000n.safetensors + index), and an fp16
                         variant made like the public one: loaded with dtype=float16 (transformers keeps the FFN's
                         `wo` in fp32, `_keep_in_fp32_modules`) and saved with variant="fp16"
    t5_relu/             tiny random T5EncoderModel, feed_forward_proj "relu" (original T5)
    clip_quick_gelu/     tiny random CLIPTextModel (quick_gelu), keys as SD 1.x stores them: `text_model.` prefix and
                         the `text_model.embeddings.position_ids` buffer (files written by transformers < 4.31)
    clip_gelu/           tiny random CLIPTextModel (gelu), as transformers 5 saves it (no prefix, no position_ids),
                         plus its fp16 variant model.fp16.safetensors
    encoders.safetensors input ids, masks and expected last_hidden_state of every model above
    spm/                 a SentencePiece unigram model (11000 pieces, T5 conventions) trained here on generated text
    clip_small/          vocab.json + merges.txt of CLIP's first 2000 merges, pad_token "!" (as SD 2.x's tokenizer)
    clip_small_tokenizer_json/  the same tokenizer as transformers 5 saves it (tokenizer.json, tokenizer_config.json)
    tokenizers.json      ~300 strings and the ids/masks transformers' T5Tokenizer and CLIPTokenizer give them
    meta.json            library versions, seeds, configs
"""
import gzip
import io
import json
import math
import random
import re
import shutil
from pathlib import Path

import sentencepiece as spm
import tokenizers
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "text"
CLIP_GZ = ROOT / "tinybooth" / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
SEED = 0
SPM_PIECES = 11000
MAX_LENGTH = 77

T5_GATED = dict(vocab_size=160, d_model=32, d_kv=12, d_ff=48, num_layers=3, num_heads=3,  # d_model != H * d_kv
                relative_attention_num_buckets=16, relative_attention_max_distance=20, dropout_rate=0.0,
                feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6)
T5_RELU = dict(T5_GATED, feed_forward_proj="relu", num_layers=2, relative_attention_num_buckets=10,  # 5 per side
               relative_attention_max_distance=7)
CLIP_BASE = dict(vocab_size=150, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=24, bos_token_id=148, eos_token_id=149, pad_token_id=149)


def randomize(model, seed):
    """Every parameter random (norm gains around 1), so a skipped or swapped tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif "relative_attention_bias" in name or "embed" in name or "shared" in name:
                p.copy_(noise)
            else:
                p.copy_(0.2 * noise if p.dim() == 1 else noise / math.sqrt(p.shape[1]))
    return model.eval()


def inputs(vocab, L, pad, lengths, seed):
    """Random ids [B, L] with the tail after each length set to pad, and the matching 0/1 mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab - 2, (len(lengths), L), generator=g)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, n:] = pad
        mask[i, :n] = 1
    return ids, mask


def make_encoders(expected):
    # ---- T5 ----
    t5 = randomize(T5EncoderModel(T5Config(**T5_GATED)), SEED + 1)
    t5.save_pretrained(OUT / "t5_gated")
    t5.save_pretrained(OUT / "t5_gated_sharded", max_shard_size="50KB")
    half = T5EncoderModel.from_pretrained(OUT / "t5_gated", dtype=torch.float16)
    assert half.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32, "wo should stay fp32"
    half.save_pretrained(OUT / "t5_gated_sharded", variant="fp16", max_shard_size="30KB")
    ids, mask = inputs(T5_GATED["vocab_size"], 30, 0, [30, 21, 7], SEED + 2)  # 30 tokens: beyond max_distance 20
    with torch.no_grad():
        expected["t5_input_ids"], expected["t5_attention_mask"] = ids, mask
        expected["t5_gated"] = t5(input_ids=ids, attention_mask=mask).last_hidden_state
        expected["t5_gated_nomask"] = t5(input_ids=ids).last_hidden_state
        expected["t5_gated_fp16"] = half(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    relu = randomize(T5EncoderModel(T5Config(**T5_RELU)), SEED + 3)
    relu.save_pretrained(OUT / "t5_relu")
    with torch.no_grad():
        expected["t5_relu"] = relu(input_ids=ids, attention_mask=mask).last_hidden_state

    # ---- CLIP ----
    ids, mask = inputs(CLIP_BASE["vocab_size"], 20, 149, [20, 12, 5], SEED + 4)
    ids[:, 0] = 148
    ids, mask = torch.cat([ids, ids[1:2].roll(8, dims=1)]), torch.cat([mask, mask[1:2].roll(8, dims=1)])  # left-padded
    expected["clip_input_ids"], expected["clip_attention_mask"] = ids, mask
    for i, act in enumerate(["quick_gelu", "gelu"]):
        clip = randomize(CLIPTextModel(CLIPTextConfig(**CLIP_BASE, hidden_act=act)), SEED + 5 + i)
        clip.save_pretrained(OUT / f"clip_{act}")
        with torch.no_grad():
            expected[f"clip_{act}"] = clip(input_ids=ids, attention_mask=mask).last_hidden_state
            expected[f"clip_{act}_nomask"] = clip(input_ids=ids).last_hidden_state
    clip.half().save_pretrained(OUT / "tmp", variant="fp16")  # model.fp16.safetensors, as SD 1.x ships one
    (OUT / "tmp" / "model.fp16.safetensors").rename(OUT / "clip_gelu" / "model.fp16.safetensors")
    shutil.rmtree(OUT / "tmp")  # (its config.json would say dtype float16; the directory's says float32)
    # the SD 1.x layout: `text_model.` prefix and the position_ids buffer (int64 [1, 24])
    file = OUT / "clip_quick_gelu" / "model.safetensors"
    state = {"text_model." + k: v for k, v in load_file(file).items()}
    state["text_model.embeddings.position_ids"] = torch.arange(CLIP_BASE["max_position_embeddings"])[None]
    save_file(state, file, metadata={"format": "pt"})
    assert torch.equal(CLIPTextModel.from_pretrained(OUT / "clip_quick_gelu").embeddings.token_embedding.weight,
                       state["text_model.embeddings.token_embedding.weight"]), "the SD layout must load in transformers"


# ---------------------------------------------------------------------------------------------------------------
# tokenizers

def clip_merges():
    lines = gzip.open(CLIP_GZ).read().decode("utf-8").split("\n")
    return [tuple(x.split()) for x in lines[1:49152 - 256 - 2 + 1]]


def byte_chars():
    """CLIP's bytes_to_unicode values in id order (written independently of tinybooth): printable bytes first."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    return [chr(b) for b in printable] + [chr(256 + n) for n, b in enumerate(b for b in range(256)
                                                                         if b not in printable)]


def write_clip_dir(path, merges, pad_token):
    """vocab.json + merges.txt as CLIP builds them: bytes, bytes + '</w>', one token per merge, then the specials."""
    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (path / "tokenizer_config.json").write_text(json.dumps(dict(pad_token=pad_token, model_max_length=77)))


def words_of(merges):
    return sorted({(a + b)[:-4] for a, b in merges if re.fullmatch("[a-z]+</w>", a + b)})


def train_spm(words, r):
    """A SentencePiece unigram model with T5's special ids (pad 0, </s> 1, unk 2, no <s>) on generated text."""
    extra = ["café", "naïve", "über", "señor", "Ärger", "東京", "日本語", "写真", "犬", "😀", "🐶", "€", "½"]
    corpus = [" ".join(r.choice(words) for _ in range(r.randint(1, 12))) for _ in range(30000)]
    corpus += [f"{r.choice(words).capitalize()} {r.choice(extra)}, {r.randint(0, 9999)}!" for _ in range(3000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=SPM_PIECES, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, num_threads=1, seed_sentencepiece_size=200000, minloglevel=2)
    d = OUT / "spm"
    d.mkdir(parents=True, exist_ok=True)
    (d / "spiece.model").write_bytes(model.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps(dict(extra_ids=100, model_max_length=MAX_LENGTH,
                                                             tokenizer_class="T5Tokenizer")))


def test_strings(words, r):
    """~300 strings: prompts, punctuation, digits, accents, CJK, emoji, whitespace, contractions, over-long text."""
    prompts = json.loads((ROOT / "tinybooth" / "assets" / "dreambooth_prompts.json").read_text())
    out = [p.format(identifier="sks", class_noun="dog") for p in prompts["object_prompts"] + prompts["live_prompts"]]
    out += ["a photo of sks dog", "A PHOTO OF A SKS DOG", "a [V] dog", "xyz", "", " ", "a", "I", "!", "123", "3.14",
            "1,000,000 dollars", "it's", "don't", "they're", "we've", "I'm", "you'll", "he'd", "O'Neil's dog",
            "hello,world", "hello ,  world", "  leading and trailing  ", "tab\tseparated\twords", "new\nline",
            "multiple     spaces", "dash-separated-words", "under_score", "e-mail@example.com", "C++ & C#",
            "50% off!!!", "(parenthesis) [brackets] {braces}", "quotes \"double\" 'single'", "a/b\\c", "#hashtag",
            "café crème brûlée", "naïve résumé", "über straße", "señor niño", "ÄÖÜ äöü ß", "Ελληνικά", "русский",
            "東京の写真", "日本語のテキスト", "中文 文本", "한국어", "😀 smiling dog 🐶", "🏳️‍🌈 flag", "€100 and ½ cup",
            "ﬁne ligature", "ｆｕｌｌｗｉｄｔｈ", "curly ‘quotes’ “here”", "ellipsis…", "em—dash", "x" * 100,
            " ".join(["long"] * 120), " ".join(r.choice(words) for _ in range(90))]
    out += [" ".join(r.choice(words) for _ in range(r.randint(1, 15))) for _ in range(120)]
    out += [f"{r.choice(words)} {r.randint(0, 99999)} {r.choice(['.', ',', '!', '?', ';', ':'])}" for _ in range(40)]
    return out


def make_tokenizers(meta):
    r = random.Random(SEED)
    merges = clip_merges()
    words = words_of(merges)
    train_spm(words, r)
    strings = test_strings(words, r)
    result = {"strings": strings, "max_length": MAX_LENGTH}

    t5 = T5Tokenizer.from_pretrained(OUT / "spm")
    enc = t5(strings, padding="max_length", max_length=MAX_LENGTH, truncation=True)
    result["t5"] = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], vocab_size=len(t5),
                        extra_id_0=t5.convert_tokens_to_ids("<extra_id_0>"),
                        extra_id_99=t5.convert_tokens_to_ids("<extra_id_99>"))
    # The fast (tokenizers) unigram and the sentencepiece library may break exact Viterbi ties differently
    # ("000" = "0" + "00" or "00" + "0", same score). Such strings are listed with sentencepiece's ids.
    sp = spm.SentencePieceProcessor(model_file=str(OUT / "spm" / "spiece.model"))
    ties = {}
    for i, (text, hf) in enumerate(zip(strings, enc["input_ids"])):
        ours = sp.encode(text)[:MAX_LENGTH - 1] + [1]
        ours += [0] * (MAX_LENGTH - len(ours))
        if ours != hf:
            score = lambda ids: sum(sp.get_score(j) for j in ids if j > 2)  # noqa: E731
            assert abs(score(ours) - score(hf)) < 1e-4 and sp.decode(ours) == sp.decode(hf), f"not a tie: {text!r}"
            ties[i] = ours
    result["t5"]["sentencepiece_ties"] = ties
    short = t5(strings[:40], padding="max_length", max_length=12, truncation=True)
    result["t5_short"] = dict(input_ids=short["input_ids"], max_length=12)
    result["t5"]["decoded"] = [t5.decode(i, skip_special_tokens=True) for i in enc["input_ids"][:60]]

    with_full = OUT / "clip_full_tmp"
    write_clip_dir(with_full, merges, "<|endoftext|>")
    clip = CLIPTokenizer.from_pretrained(with_full)
    enc = clip(strings, padding="max_length", max_length=MAX_LENGTH, truncation=True)
    result["clip"] = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], vocab_size=len(clip),
                          sks=clip("sks", add_special_tokens=False)["input_ids"])
    shutil.rmtree(with_full)

    write_clip_dir(OUT / "clip_small", merges[:2000], "!")
    small = CLIPTokenizer.from_pretrained(OUT / "clip_small")
    small.save_pretrained(OUT / "clip_small_tokenizer_json")  # transformers 5 writes tokenizer.json only
    enc = small(strings[:80], padding="max_length", max_length=MAX_LENGTH, truncation=True)
    result["clip_small"] = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                vocab_size=len(small), pad_id=small.pad_token_id)
    with open(OUT / "tokenizers.json", "w") as f:
        json.dump(result, f, ensure_ascii=False, separators=(",", ":"))
    meta["tokenizers"] = dict(spm_pieces=SPM_PIECES, strings=len(strings), clip_small_merges=2000)


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    torch.manual_seed(SEED)
    meta = dict(torch=torch.__version__, transformers=transformers.__version__, sentencepiece=spm.__version__,
                tokenizers=tokenizers.__version__, seed=SEED, t5_gated=T5_GATED, t5_relu=T5_RELU, clip=CLIP_BASE)
    expected = {}
    make_encoders(expected)
    save_file({k: v.contiguous() for k, v in expected.items()}, OUT / "encoders.safetensors")
    make_tokenizers(meta)
    meta["fp16_file_dtypes"] = {}
    for file in sorted((OUT / "t5_gated_sharded").glob("model.fp16-*.safetensors")):
        with safe_open(str(file), "pt") as f:
            meta["fp16_file_dtypes"].update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
