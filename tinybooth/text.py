"""The text side of DreamBooth: prompt -> token ids -> text embedding c (the conditioning of x_hat_theta(z_t, c)).

The paper conditions Imagen on a frozen T5-XXL encoder through a SentencePiece tokenizer; the public cascade of that
design, DeepFloyd IF, uses the T5 v1.1 XXL encoder (77 tokens, padding mask passed to T5). Stable Diffusion 1.x
conditions on the CLIP ViT-L/14 text transformer through a byte-level BPE tokenizer. Both are written out here and
load the published files directly, tensor names kept (the few keys some files add are listed in one small ALIASES
table per encoder):

    T5 v1.1 encoder (Raffel et al. 2020, v1.1 changes)          CLIP text transformer (Radford et al. 2021)
    h_0 = E[ids]           (no position embedding)              h_0 = E[ids] + P[0..L-1]
    h' = h + Attn(RMSNorm(h), bias = b(j - i))                  h' = h + Attn(LN(h), causal mask)
    h  = h' + wo(gelu_tanh(wi_0 h') * wi_1 h')  (gated-GELU)    h  = h' + fc2(quick_gelu(fc1(LN(h'))))
    c  = RMSNorm(h_L)                                           c  = LN(h_L)

T5's differences from the textbook transformer, each of which changes the numbers:
  * RMSNorm: x / sqrt(mean(x^2) + eps) * w, no mean subtraction and no bias; the mean of squares is taken in fp32.
  * attention logits are q k^T with NO 1/sqrt(d_kv) (the scale was folded into the initialisation of q).
  * positions enter only as a learned scalar bias per head and per *bucket* of the relative distance j - i
    (exact buckets for small distances, logarithmic ones up to max_distance); the bias table lives in block 0 and
    is shared by every block.
  * the public fp16 files keep some tensors (the FFN's `wo`) in fp32 and T5 overflows in plain fp16: run T5 in bf16
    or fp32. With the file's own dtypes (dtype=None) the FFN input is cast to `wo`'s dtype as transformers does.

The tokenizers wrap the `sentencepiece` (T5) and `tokenizers` (CLIP BPE) packages and return fixed-length ids and
an attention mask, padded/truncated the way the public pipelines call them (padding="max_length", truncation=True).
"""
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint
from .checkpoint import CheckpointError
from .errors import UserError
from .files import read_json

GELU_TANH = lambda x: F.gelu(x, approximate="tanh")  # noqa: E731  transformers' "gelu_new"


def config_fields(cls, config, defaults):
    """The dataclass cls built from a public config.json: listed keys, the reference library's defaults otherwise."""
    merged = {**defaults, **config}
    return cls(**{f.name: merged[f.name] for f in fields(cls) if f.name in merged})


def split_loaded_keys(state, table, name):
    """Apply a small {file key: our key or None} table to a loaded state dict (see ALIASES of each encoder).

    A file key mapped to None is dropped (a buffer we compute instead); mapped to another name it is renamed, unless
    that name is already in the file, in which case both must hold the same tensor (a tied copy)."""
    state = dict(state)
    for file_key, ours in table.items():
        if file_key not in state:
            continue
        t = state.pop(file_key)
        if ours is None:
            continue
        if ours in state and not torch.equal(state[ours], t):
            raise checkpoint.CheckpointError(f"{name}: '{file_key}' and '{ours}' should be the same tied tensor but "
                                             f"differ; the checkpoint is corrupt, download it again")
        state.setdefault(ours, t)
    return state


# ================================================================================================================
# T5 v1.1 encoder

T5_DEFAULTS = dict(  # transformers' T5Config defaults, for keys a config.json leaves out
    vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, layer_norm_epsilon=1e-6, feed_forward_proj="relu")
T5_FFN = {"gated-gelu": (GELU_TANH, True), "relu": (F.relu, False)}  # feed_forward_proj -> (activation, gated)

T5_PRESETS = {  # encoder-only parameter counts (T5EncoderModel)
    "t5-v1_1-xxl": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                        feed_forward_proj="gated-gelu"),  # 4,762,310,656 params (DeepFloyd IF's text_encoder/)
}


@dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int                          # D
    d_kv: int                             # per-head width (d_model need not equal num_heads * d_kv)
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float
    feed_forward_proj: str

    def __post_init__(self):
        if self.feed_forward_proj not in T5_FFN:
            raise UserError(f"feed_forward_proj={self.feed_forward_proj!r} is not supported; expected one of "
                             f"{list(T5_FFN)} (T5 v1.1 / DeepFloyd IF use 'gated-gelu')")


def relative_position_bucket(relative_position, num_buckets=32, max_distance=128):
    """Bidirectional T5 bucket of each relative distance j - i (key position minus query position).

    Half the buckets for j - i > 0, half for j - i <= 0. In each half, distances n < num_buckets/4 get a bucket of
    their own; larger ones share logarithmically wider buckets, the last one holding every n >= max_distance:
        bucket(n) = n                                                       if n < n_exact = num_buckets / 4
                  = n_exact + floor(log(n / n_exact) / log(max_distance / n_exact) * (num_buckets/2 - n_exact))
    (clamped to num_buckets/2 - 1), plus num_buckets/2 when j - i > 0. relative_position: a LongTensor.
    """
    # BEGIN ASSIGN 4.1
    # HINT: half = num_buckets // 2; offset half if j - i > 0; n = |j - i|; exact below half // 2, log-spaced above
    half = num_buckets // 2
    bucket = (relative_position > 0).long() * half
    n = relative_position.abs()
    n_exact = half // 2
    log_ratio = torch.log(n.float() / n_exact) / math.log(max_distance / n_exact)
    large = n_exact + (log_ratio * (half - n_exact)).long()
    large = torch.clamp(large, max=half - 1)
    return bucket + torch.where(n < n_exact, n, large)
    # END ASSIGN 4.1


def rms_norm(x, weight, eps):
    """RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w: no mean subtracted, no bias; mean(x^2) in fp32 (T5's layer norm).

    The normalised x is cast to w's dtype when w is half precision (fp16/bf16 weights), as transformers does."""
    # BEGIN ASSIGN 4.2
    # HINT: variance = x.float().pow(2).mean(-1, keepdim=True); x * rsqrt(variance + eps), cast to a half w's dtype
    variance = x.float().pow(2).mean(-1, keepdim=True)  # mean(x^2)   [B, L, 1]
    x = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(weight.dtype)
    return weight * x
    # END ASSIGN 4.2


class T5LayerNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class T5Attention(nn.Module):
    """Multi-head self-attention with T5's relative position bias and no 1/sqrt(d_kv) scaling."""

    def __init__(self, c, has_relative_attention_bias):
        super().__init__()
        self.c = c
        inner = c.num_heads * c.d_kv
        self.q, self.k, self.v = (nn.Linear(c.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, c.d_model, bias=False)
        if has_relative_attention_bias:  # only block 0 holds the bias table; the other blocks reuse its output
            self.relative_attention_bias = nn.Embedding(c.relative_attention_num_buckets, c.num_heads)

    def position_bias(self, L):
        """b[h, i, j] = table[bucket(j - i), h], the learned scalar bias per head and relative distance. [1, H, L, L]"""
        pos = torch.arange(L, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.c.relative_attention_num_buckets,
                                           self.c.relative_attention_max_distance)  # [L, L]
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # [L, L, H] -> [1, H, L, L]

    def forward(self, x, bias):
        """x [B, L, D]; bias [B or 1, H, L, L] (position bias + padding mask, fp32) -> [B, L, D]."""
        # BEGIN ASSIGN 4.3
        # HINT: q, k, v as [B, H, L, d_kv]; weights = softmax(q k^T + bias) in fp32 (no 1/sqrt(d_kv)); o(weights v)
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.c.num_heads, self.c.d_kv).transpose(1, 2)  # [B, H, L, d_kv]
                   for proj in (self.q, self.k, self.v))
        scores = (q @ k.transpose(-1, -2)).float() + bias  # q k^T + b   [B, H, L, L]
        weights = scores.softmax(dim=-1).to(v.dtype)
        y = (weights @ v).transpose(1, 2).reshape(B, L, -1)  # [B, H, L, d_kv] -> [B, L, H * d_kv]
        return self.o(y)
        # END ASSIGN 4.3


class T5LayerSelfAttention(nn.Module):
    def __init__(self, c, has_relative_attention_bias):
        super().__init__()
        self.SelfAttention = T5Attention(c, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, h, bias):
        return h + self.SelfAttention(self.layer_norm(h), bias)  # h' = h + Attn(RMSNorm(h))


class T5DenseReluDense(nn.Module):
    """wo(act(wi_0 x) * wi_1 x) for the gated variants (T5 v1.1), wo(relu(wi x)) for the original T5."""

    def __init__(self, c):
        super().__init__()
        self.act, self.gated = T5_FFN[c.feed_forward_proj]
        if self.gated:
            self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
            self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        else:
            self.wi = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))  # [B, L, d_ff]
        # the public fp16 files store wo in fp32: its input is raised to fp32 too (fp16 would overflow here)
        return self.wo(h.to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(c)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, h):
        return h + self.DenseReluDense(self.layer_norm(h))  # h = h' + FFN(RMSNorm(h'))


class T5Block(nn.Module):
    def __init__(self, c, has_relative_attention_bias):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(c, has_relative_attention_bias), T5LayerFF(c)])

    def forward(self, h, bias):
        return self.layer[1](self.layer[0](h, bias))


class T5Stack(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block = nn.ModuleList(T5Block(c, has_relative_attention_bias=(i == 0)) for i in range(c.num_layers))
        self.final_layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """The T5 encoder: token ids [B, L] -> c = last hidden state [B, L, D] (after the final RMSNorm).

    State dict = transformers' T5EncoderModel file: `shared.weight`, `encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}
    .weight`, `encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight`, `encoder.block.{i}.layer.1.
    DenseReluDense.{wi_0,wi_1,wo}.weight`, the `layer_norm`s and `encoder.final_layer_norm.weight`.
    Run it in bf16 or fp32, never plain fp16 (T5's activations overflow fp16).
    """
    # file keys that are not ours (see split_loaded_keys): the token embedding is tied to `encoder.embed_tokens`,
    # which transformers 4.x wrote to some files alongside (or, rarely, instead of) `shared.weight`
    ALIASES = {"encoder.embed_tokens.weight": "shared.weight"}

    def __init__(self, config):
        super().__init__()
        self.config = dict(config)
        self.c = config_fields(T5Config, config, T5_DEFAULTS)
        self.shared = nn.Embedding(self.c.vocab_size, self.c.d_model)
        self.encoder = T5Stack(self.c)
        self._init_weights()

    def _init_weights(self):
        """T5's initialisation (Mesh TensorFlow): the missing 1/sqrt(d_kv) of attention is folded into q's std."""
        c = self.c
        std = {"q": (c.d_model * c.d_kv) ** -0.5, "o": (c.num_heads * c.d_kv) ** -0.5, "wo": c.d_ff ** -0.5}
        nn.init.normal_(self.shared.weight, std=1.0)
        for name, p in self.encoder.named_parameters():
            if not name.endswith("layer_norm.weight"):  # norm gains stay 1
                nn.init.normal_(p, std=std.get(name.split(".")[-2], c.d_model ** -0.5))  # k, v, wi, bias table

    @classmethod
    def from_config(cls, config):
        return cls(config)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, variant=None):
        """A T5EncoderModel directory (single file, sharded, or variant='fp16'). dtype=None keeps each tensor's own
        dtype (the public fp16 files keep `wo` in fp32); pass torch.bfloat16 or torch.float32 to cast all."""
        convert = lambda state, name: split_loaded_keys(state, cls.ALIASES, name)  # noqa: E731
        return checkpoint.load_pretrained(cls, path, "model", dtype, device, variant, convert=convert)

    def save_pretrained(self, path):
        return checkpoint.save_pretrained(self, path, self.config, "model")

    def forward(self, input_ids, attention_mask=None):
        """input_ids [B, L] (LongTensor), attention_mask [B, L] (1 = token, 0 = padding) -> [B, L, D]."""
        B, L = input_ids.shape
        h = self.shared(input_ids)  # h_0 = E[ids]: no position embedding in T5   [B, L, D]
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(L).float()  # shared by all blocks
        if attention_mask is not None:  # padded keys get the most negative fp32: softmax gives them weight 0
            bias = bias + (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for block in self.encoder.block:
            h = block(h, bias)
        return self.encoder.final_layer_norm(h)  # c = RMSNorm(h_L)   [B, L, D]


# ================================================================================================================
# Tokenizers

def as_list(texts):
    return [texts] if isinstance(texts, str) else list(texts)


def pad_and_truncate(token_lists, max_length, bos, eos, pad):
    """Fixed-length ids and mask: [bos] + tokens + [eos], the tokens cut so the whole fits max_length (eos kept),
    then pad ids (mask 0) up to max_length. bos=None for T5 (no start token). Returns two LongTensors [B, L]."""
    # BEGIN ASSIGN 4.4
    # HINT: room = max_length - 1 - (bos is not None); seq = [bos] + tokens[:room] + [eos]; mask 1 on seq, 0 on pads
    head = [] if bos is None else [bos]
    room = max_length - len(head) - 1
    ids = torch.full((len(token_lists), max_length), pad, dtype=torch.long)
    mask = torch.zeros((len(token_lists), max_length), dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        seq = head + list(tokens[:room]) + [eos]
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    return ids, mask
    # END ASSIGN 4.4


class T5Tokenizer:
    """SentencePiece tokenizer of T5 (spiece.model) with T5's 100 sentinel tokens and `</s>` appended.

    ids: 0..N-1 are the SentencePiece pieces (pad 0, </s> 1, unk 2 in the public model), then the extra ids in
    REVERSE order as transformers numbers them: <extra_id_0> = N + 99, ..., <extra_id_99> = N. Text is passed to
    SentencePiece as is: special-token strings such as "<extra_id_0>" inside a prompt are not parsed.
    """

    def __init__(self, spiece_file, extra_ids=100):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(spiece_file))
        self.extra_ids = extra_ids
        n = self.sp.get_piece_size()
        self.pad_id, self.eos_id, self.unk_id = self.sp.pad_id(), self.sp.eos_id(), self.sp.unk_id()
        if self.pad_id < 0 or self.eos_id < 0:
            raise UserError(f"'{spiece_file}' has no pad or eos piece (pad_id={self.pad_id}, eos_id={self.eos_id}); "
                             f"T5 needs <pad> and </s> (train with pad_id=0, eos_id=1, unk_id=2)")
        self.extra_tokens = {n + extra_ids - 1 - i: f"<extra_id_{i}>" for i in range(extra_ids)}

    @classmethod
    def from_pretrained(cls, path):
        """A tokenizer directory with spiece.model (+ tokenizer_config.json giving extra_ids, default 100)."""
        path = Path(path)
        spiece = path / "spiece.model"
        if not spiece.exists():
            saved_by_transformers = " (tokenizer.json alone is what transformers >= 5 saves: copy spiece.model " \
                                    "from the original tokenizer)" if (path / "tokenizer.json").exists() else ""
            raise CheckpointError(f"no spiece.model in '{path}'{saved_by_transformers}; a T5 tokenizer directory "
                                    f"holds spiece.model (DeepFloyd IF: <pipeline>/tokenizer/). "
                                    f"Download: {checkpoint.DOWNLOAD_HINT}")
        cfg_file = path / "tokenizer_config.json"
        cfg = read_json(cfg_file) if cfg_file.exists() else {}
        return cls(spiece, extra_ids=cfg.get("extra_ids", 100))

    @property
    def vocab_size(self):
        return self.sp.get_piece_size() + self.extra_ids

    @property
    def num_pieces(self):
        """Ids 0..num_pieces-1 are the learned vocabulary (the sentinel <extra_id_i> come after)."""
        return self.sp.get_piece_size()

    def __len__(self):
        return self.vocab_size

    def tokenize(self, text):
        """The ids of text without </s> or padding."""
        return self.sp.encode(text)

    def __call__(self, texts, max_length=77):
        """texts (str or list) -> input_ids, attention_mask: LongTensors [B, max_length]; `</s>` ends each text."""
        return pad_and_truncate([self.tokenize(t) for t in as_list(texts)], max_length, None, self.eos_id,
                                self.pad_id)

    def decode(self, ids):
        """Text of ids, skipping pad, </s> and <unk>; sentinel ids are written as <extra_id_i>."""
        ids = [int(i) for i in ids if int(i) not in (self.pad_id, self.eos_id, self.unk_id)]
        out, run = [], []
        for i in ids + [None]:
            if i is None or i in self.extra_tokens:
                out.append(self.sp.decode(run))
                run = []
                if i is not None:
                    out.append(self.extra_tokens[i])
            else:
                run.append(i)
        return "".join(out)
