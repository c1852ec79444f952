"""CLIP's text side, as Stable Diffusion 1.x uses it: a byte-level BPE tokenizer and the CLIP ViT-L/14 text
transformer (Radford et al. 2021), loading the published files directly (tinybooth.text has T5, the other encoder,
the formulas of both side by side, and the helpers they share).

    h_0 = E[ids] + P[0..L-1]
    h'  = h + Attn(LN(h), causal mask)
    h   = h' + fc2(quick_gelu(fc1(LN(h'))))
    c   = LN(h_L)
"""
import gzip
import html
import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint
from .checkpoint import CheckpointError
from .errors import UserError
from .text import as_list, config_fields, pad_and_truncate, split_loaded_keys

# ================================================================================================================
# CLIP text transformer (Stable Diffusion 1.x)

CLIP_DEFAULTS = dict(  # transformers' CLIPTextConfig defaults, for keys a config.json leaves out
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CLIP_ACT = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP's sigmoid approximation of gelu
            "gelu": F.gelu}                                          # exact x * Phi(x)

CLIP_PRESETS = {
    "clip-vit-large-patch14": dict(model_type="clip_text_model", vocab_size=49408, hidden_size=768,
                                   intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                   max_position_embeddings=77, hidden_act="quick_gelu"),  # 123,060,480 params (SD 1.x)
}


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int
    hidden_size: int              # D
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int  # the longest token sequence (77)
    hidden_act: str
    layer_norm_eps: float

    def __post_init__(self):
        if self.hidden_act not in CLIP_ACT:
            raise UserError(f"hidden_act={self.hidden_act!r} is not supported; expected one of {list(CLIP_ACT)}")
        if self.hidden_size % self.num_attention_heads:
            raise UserError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")


def causal_attention_mask(L, attention_mask=None, device=None):
    """Which keys each query of CLIP's text attention may see: key j for query i only if j <= i (causal), and only
    if key j is a token, not padding, when attention_mask [B, L] is given. Boolean, True = visible. [B or 1, 1, L, L]
    """
    # BEGIN ASSIGN 4.5
    # HINT: allowed = lower-triangular ones (j <= i), and-ed with attention_mask[:, None, None, :].bool() when given
    allowed = torch.ones(L, L, dtype=torch.bool, device=device).tril()[None, None]  # [1, 1, L, L]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()                  # [B, 1, L, L]
    return allowed
    # END ASSIGN 4.5


class CLIPAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.num_heads = c.num_attention_heads
        D = c.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x, allowed):
        """softmax(Q K^T / sqrt(d_h)) V per head over the allowed keys, then out_proj. x [B, L, D], allowed
        [B or 1, 1, L, L] (causal_attention_mask)."""
        B, L, D = x.shape
        q, k, v = (proj(x).view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2)  # [B, nh, L, hs]
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # [B, nh, L, hs]
        # a query with no visible key (a padding position before the text: left padding) gets 0, as in
        # transformers; its output is padding, never used
        y = y.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))      # [B, L, D]


class CLIPMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.act = CLIP_ACT[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = CLIPAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)

    def forward(self, h, allowed):
        h = h + self.self_attn(self.layer_norm1(h), allowed)  # h' = h + Attn(LN(h))
        return h + self.mlp(self.layer_norm2(h))           # h  = h' + MLP(LN(h'))


class CLIPEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.num_hidden_layers))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)

    def forward(self, input_ids):
        L = input_ids.shape[1]
        if L > self.position_embedding.num_embeddings:
            raise UserError(f"{L} tokens but CLIP has {self.position_embedding.num_embeddings} positions; "
                             f"tokenize with max_length <= {self.position_embedding.num_embeddings}")
        positions = torch.arange(L, device=input_ids.device)  # computed here, never a buffer (see ALIASES)
        return self.token_embedding(input_ids) + self.position_embedding(positions)  # E[ids] + P[0..L-1]


class CLIPTextTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(c)
        self.encoder = CLIPEncoder(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class CLIPTextEncoder(nn.Module):
    """CLIP's text transformer: token ids [B, L] -> c = last hidden state [B, L, D] (after the final layer norm).

    State dict = SD 1.x's text_encoder/model.safetensors: every key prefixed `text_model.` (`text_model.embeddings.
    token_embedding.weight`, `text_model.encoder.layers.{i}.self_attn.q_proj.weight`, ...,
    `text_model.final_layer_norm.weight`). Attention is causal; attention_mask, when given, also hides padding keys
    (SD 1.x pipelines pass none: the U-Net sees all 77 outputs, padding positions included).
    """
    # file keys that are not ours (see split_loaded_keys): files written by transformers < 4.31 (SD 1.x's among
    # them) store the position ids 0..76 as a buffer; we compute them in forward.
    ALIASES = {"text_model.embeddings.position_ids": None}
    PREFIX = "text_model."  # transformers >= 5 writes the same tensors without it; we add it when loading

    def __init__(self, config):
        super().__init__()
        if config.get("model_type", "clip_text_model") != "clip_text_model":
            raise UserError(f"model_type={config.get('model_type')!r}: expected a CLIPTextModel config.json "
                             f"(model_type 'clip_text_model', e.g. Stable Diffusion's text_encoder/)")
        self.config = dict(config)
        self.c = config_fields(CLIPTextConfig, config, CLIP_DEFAULTS)
        self.text_model = CLIPTextTransformer(self.c)
        for emb in (self.text_model.embeddings.token_embedding, self.text_model.embeddings.position_embedding):
            nn.init.normal_(emb.weight, std=0.02)  # CLIP's initialisation of the embeddings

    @classmethod
    def from_config(cls, config):
        return cls(config)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, variant=None):
        """A CLIPTextModel directory (SD 1.x: <pipeline>/text_encoder), keys with or without `text_model.`."""
        def convert(state, name):
            state = {k if k.startswith(cls.PREFIX) else cls.PREFIX + k: v for k, v in state.items()}
            return split_loaded_keys(state, cls.ALIASES, name)
        return checkpoint.load_pretrained(cls, path, "model", dtype, device, variant, convert=convert)

    def save_pretrained(self, path):
        return checkpoint.save_pretrained(self, path, self.config, "model")

    def forward(self, input_ids, attention_mask=None):
        """input_ids [B, L] (LongTensor), attention_mask [B, L] (1 = token, 0 = padding) or None -> [B, L, D]."""
        m = self.text_model
        h = m.embeddings(input_ids)  # [B, L, D]
        allowed = causal_attention_mask(input_ids.shape[1], attention_mask, h.device)  # [B or 1, 1, L, L]
        for layer in m.encoder.layers:
            h = layer(h, allowed)
        return m.final_layer_norm(h)  # c = LN(h_L)   [B, L, D]


# ----------------------------------------------------------------------------------------------------------------
# CLIP tokenizer

CLIP_VOCAB_GZ = "bpe_simple_vocab_16e6.txt.gz"       # OpenAI CLIP's file (MIT): the BPE merges, one per line
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's word pattern: the special tokens, English contractions, runs of letters, single digits, runs of other signs
CLIP_WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@lru_cache()
def bytes_to_unicode():
    """GPT-2/CLIP byte -> printable character table (byte-level BPE works on these 256 characters).

    The 188 printable latin-1 bytes map to themselves and come first (CLIP's ids 0..187: '!' = 0), then the other
    68 bytes map to chr(256), chr(257), ... in byte order (ids 188..255). The dict's order is the id order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def clip_vocab_from_gz(path):
    """(vocab {token: id}, merges [(a, b)]) the way CLIP builds them from bpe_simple_vocab_16e6.txt.gz:
    256 byte characters, the same with '</w>' (end of word), one token per merge (48894 merges), then
    <|startoftext|> = 49406 and <|endoftext|> = 49407."""
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # line 0 is a version header
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [CLIP_BOS, CLIP_EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def _ftfy_table():
    """The character repairs of ftfy.fix_text (ftfy 6) that are fixed tables: half-/full-width forms to standard
    width (NFKC of U+FF01..U+FFEF, and the ideographic space U+3000 to ' '), Latin ligatures to their letters,
    curly quotes to straight ones. {code point: replacement} for str.translate."""
    table = {0x3000: " "}
    for i in range(0xFF01, 0xFFF0):                      # 'Ｆ' -> 'F', 'ｶ' -> 'カ'
        folded = unicodedata.normalize("NFKC", chr(i))
        if folded != chr(i):
            table[i] = folded
    for lig, letters in zip("ĲĳŉǱǲǳǄǅǆǇǈǉǊǋǌﬀﬁﬂﬃﬄﬅﬆ", ("IJ ij ʼn DZ Dz dz DŽ Dž dž LJ Lj lj NJ Nj nj "
                                                    "ff fi fl ffi ffl ſt st").split()):
        table[ord(lig)] = letters
    table.update({i: "'" for i in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)})
    table.update({i: '"' for i in (0x201C, 0x201D, 0x201E, 0x201F)})
    return table


FTFY_TABLE = _ftfy_table()


def clean_text(text):
    """CLIP's basic_clean + whitespace_clean + lower-casing, without ftfy (not a dependency of tinybooth).

    CLIP (and transformers, when ftfy is installed) runs ftfy.fix_text first. We apply its table-driven repairs
    (FTFY_TABLE: full-width 'ＦＵＬＬ' -> 'FULL', ligatures, curly quotes) and its final NFC normalisation, but not
    its guesses (mojibake such as 'cafÃ©' -> 'café'), so only such broken text can tokenise differently."""
    text = unicodedata.normalize("NFC", text.translate(FTFY_TABLE))
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip().lower()


class CLIPTokenizer:
    """CLIP's byte-level BPE: clean and lower-case the text, split it into words with CLIP_WORDS, map each word's
    UTF-8 bytes to characters (bytes_to_unicode), merge pairs by rank with '</w>' ending each word; then
    <|startoftext|> + tokens + <|endoftext|>, padded with pad_id (49407 = <|endoftext|> for SD 1.x).

    The BPE itself runs in the `tokenizers` package."""

    def __init__(self, vocab, merges, pad_token=CLIP_EOS):
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers
        bpe = models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                         unk_token=CLIP_EOS, fuse_unk=False)
        self.tok = Tokenizer(bpe)
        self.tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_WORDS), behavior="removed", invert=True),  # keep the words only
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])         # bytes -> characters
        self.tok.add_special_tokens([CLIP_BOS, CLIP_EOS])
        self.vocab = vocab
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.bos_id, self.eos_id = vocab[CLIP_BOS], vocab[CLIP_EOS]
        if pad_token not in vocab:
            raise UserError(f"pad_token {pad_token!r} is not in the CLIP vocabulary; check tokenizer_config.json")
        self.pad_id = vocab[pad_token]

    @classmethod
    def from_pretrained(cls, path):
        """A tokenizer directory with vocab.json + merges.txt (SD 1.x: <pipeline>/tokenizer/), a transformers
        tokenizer.json, or CLIP's bpe_simple_vocab_16e6.txt.gz; the pad token comes from tokenizer_config.json
        (default <|endoftext|>)."""
        from tokenizers import models
        path = Path(path)
        if (path / "vocab.json").exists() and (path / "merges.txt").exists():
            vocab, merges = models.BPE.read_file(str(path / "vocab.json"), str(path / "merges.txt"))
        elif (path / "tokenizer.json").exists():  # what transformers >= 5 writes: the same vocab and merges inside
            bpe = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            vocab, merges = bpe["vocab"], [tuple(m.split(" ") if isinstance(m, str) else m) for m in bpe["merges"]]
        elif (path / CLIP_VOCAB_GZ).exists():
            vocab, merges = clip_vocab_from_gz(path / CLIP_VOCAB_GZ)
        else:
            raise CheckpointError(f"'{path}' has no vocab.json + merges.txt, tokenizer.json or {CLIP_VOCAB_GZ}; "
                                    f"a CLIP tokenizer directory is <pipeline>/tokenizer/. "
                                    f"Download: {checkpoint.DOWNLOAD_HINT}")
        pad = CLIP_EOS
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the later file wins
            if (path / name).exists():
                pad = json.loads((path / name).read_text(encoding="utf-8")).get("pad_token") or pad
        return cls(vocab, merges, pad_token=pad["content"] if isinstance(pad, dict) else pad)

    @property
    def vocab_size(self):
        return len(self.vocab)

    @property
    def num_pieces(self):
        """Ids 0..num_pieces-1 are the learned vocabulary (bytes, bytes + '</w>', merges); the start/end follow."""
        return min(self.bos_id, self.eos_id)

    def __len__(self):
        return self.vocab_size

    def tokenize(self, text):
        """The BPE ids of text, without <|startoftext|>, <|endoftext|> or padding."""
        return self.tok.encode(clean_text(text), add_special_tokens=False).ids

    def __call__(self, texts, max_length=77):
        """texts (str or list) -> input_ids, attention_mask: LongTensors [B, max_length]."""
        return pad_and_truncate([self.tokenize(t) for t in as_list(texts)], max_length, self.bos_id, self.eos_id,
                                self.pad_id)

    def decode(self, ids):
        """Text of ids without the start/end/pad tokens; '</w>' (end of word) becomes a space."""
        specials = (self.bos_id, self.eos_id, self.pad_id)
        chars = "".join(self.id_to_token[int(i)] for i in ids if int(i) not in specials)
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        text = bytearray(byte_of[c] for c in chars).decode("utf-8", errors="replace")  # '</w>' is ASCII: kept
        return text.replace("</w>", " ").strip()
