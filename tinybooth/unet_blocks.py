"""The layers a diffusion U-Net is assembled from: time embedding, ResBlock, the two kinds of attention.

x_hat_theta(z_t, t, c) needs three things from its layers:

  * *when* in the diffusion it is: a sinusoidal embedding of t (the transformer position code, applied to the noise
    step), turned by a small MLP into a vector that every ResBlock adds to (or scales and shifts) its features;
  * *what* the image shows locally: ResBlocks (GroupNorm -> act -> 3x3 conv, twice, plus a skip);
  * *what the text says*: attention from image positions to the text tokens c.

The text enters in one of two ways, one per public model family:

  * DeepFloyd IF (and Imagen, whose design it follows): "added-KV" attention. The text tokens are projected to extra
    keys and values and *concatenated* with the image's own keys and values, so one softmax mixes self-attention
    and cross-attention:  softmax(q [k_text; k_img]^T / sqrt(d)) [v_text; v_img].
  * Stable Diffusion: a small transformer per resolution (self-attention, then cross-attention with q from the
    image and k, v from the text, then a GEGLU feed-forward), each sub-layer pre-normed and residual.

Attribute names are those of the public checkpoints (diffusers' layout), so a checkpoint's keys map one-to-one
onto this module tree. All attention goes through torch's scaled_dot_product_attention (flash / memory-efficient
kernels on GPU).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "mish": nn.Mish, "relu": nn.ReLU}


def activation(name):
    """The nn.Module for an activation name of the public configs ('silu', 'gelu', ...)."""
    return ACTIVATIONS[name]()


# ----------------------------------------------------------------------------------------------------------------
# time (and noise-level) embedding

def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0.0, max_period=10000.0):
    """Sinusoidal embedding of (possibly fractional) steps t: [B] -> [B, dim], float32.

    With half = dim // 2 and frequencies  w_i = max_period^(-i / (half - freq_shift)),  i = 0..half-1:
        emb(t) = [cos(t w_0), ..., cos(t w_{half-1}), sin(t w_0), ..., sin(t w_{half-1})]   (flip_sin_to_cos)
        emb(t) = [sin(...), cos(...)]                                                        (otherwise)
    (Vaswani et al. 2017's position code, used for the diffusion step by Ho et al. 2020.) Odd dim: one zero column.
    """
    # BEGIN ASSIGN 6.1
    # HINT: w_i = max_period ** (-i / (half - freq_shift)); emb = [cos(t w), sin(t w)] when flip_sin_to_cos
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t[:, None].float() * torch.exp(exponent)[None, :]            # [B, half]
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # [B, 2 half]
    # END ASSIGN 6.1
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal code: linear_1 -> act -> linear_2 (-> post_act)."""

    def __init__(self, in_dim, dim, act_fn, post_act_fn=None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = activation(act_fn)
        self.linear_2 = nn.Linear(dim, dim)
        self.post_act = activation(post_act_fn) if post_act_fn else None

    def forward(self, x):
        x = self.linear_2(self.act(self.linear_1(x)))
        return self.post_act(x) if self.post_act is not None else x


class AttentionPooling(nn.Module):
    """Pool a token sequence to one vector: a "class token" (mean of the tokens + a learned offset) attends to
    itself and all tokens. IF uses it to add a summary of the prompt to the time embedding."""

    def __init__(self, num_heads, dim):
        super().__init__()
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(torch.randn(1, dim) / dim ** 0.5)
        self.k_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)

    def forward(self, x):                                                   # x: [B, L, D]
        B, L, D = x.shape
        h = self.num_heads
        cls = x.mean(dim=1, keepdim=True) + self.positional_embedding.to(x.dtype)   # [B, 1, D]
        x = torch.cat([cls, x], dim=1)                                        # [B, L+1, D]
        q = self.q_proj(cls).view(B, 1, h, D // h).transpose(1, 2)            # [B, h, 1, D/h]
        k = self.k_proj(x).view(B, L + 1, h, D // h).transpose(1, 2)          # [B, h, L+1, D/h]
        v = self.v_proj(x).view(B, L + 1, h, D // h).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, D)  # [B, D]


class TextTimeEmbedding(nn.Module):
    """IF's pooled-text conditioning, added to the time embedding: LN -> attention pooling -> linear -> LN."""

    def __init__(self, text_dim, time_dim, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(text_dim)
        self.pool = AttentionPooling(num_heads, text_dim)
        self.proj = nn.Linear(text_dim, time_dim)
        self.norm2 = nn.LayerNorm(time_dim)

    def forward(self, c):                                                   # [B, L, D_text] -> [B, D_time]
        return self.norm2(self.proj(self.pool(self.norm1(c))))


# ----------------------------------------------------------------------------------------------------------------
# ResBlock

class ResnetBlock2D(nn.Module):
    """h = conv2(act(norm2(conv1(act(norm1(x)))) conditioned on emb)) ;  out = (skip(x) + h) / output_scale_factor.

    Time conditioning, with e = time_emb_proj(act(emb)) (IF-II skips that act: skip_time_act):
        "default":      norm2(h + e)
        "scale_shift":  norm2(h) * (1 + scale) + shift,   [scale, shift] = e   (Dhariwal & Nichol 2021, "AdaGN")
    up / down: nearest x2 upsampling / 2x2 average pooling of both paths after the first norm (IF's resampling
    ResBlocks); SD resamples with separate convolutions instead (Downsample2D / Upsample2D).
    """

    def __init__(self, in_ch, out_ch, temb_dim, groups, eps, act_fn, time_scale_shift="default",
                 skip_time_act=False, output_scale_factor=1.0, dropout=0.0, up=False, down=False):
        super().__init__()
        self.time_scale_shift, self.skip_time_act = time_scale_shift, skip_time_act
        self.output_scale_factor, self.dropout, self.up, self.down = output_scale_factor, dropout, up, down
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch * (2 if time_scale_shift == "scale_shift" else 1))
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nonlinearity = activation(act_fn)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return F.avg_pool2d(x, 2) if self.down else x

    def forward(self, x, emb):                                              # x: [B, C_in, H, W], emb: [B, D_t]
        h = self.nonlinearity(self.norm1(x))
        x, h = self.resample(x), self.resample(h)
        h = self.conv1(h)                                                     # [B, C_out, H', W']
        e = emb if self.skip_time_act else self.nonlinearity(emb)
        e = self.time_emb_proj(e)[:, :, None, None]                           # [B, C_out or 2 C_out, 1, 1]
        # BEGIN ASSIGN 6.2
        # HINT: scale_shift: norm2(h) * (1 + scale) + shift with scale, shift = e.chunk(2, dim=1); default: norm2(h + e)
        if self.time_scale_shift == "scale_shift":
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        # END ASSIGN 6.2
        h = F.dropout(self.nonlinearity(h), self.dropout, self.training)
        h = self.conv2(h)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """SD's downsampling: a 3x3 convolution with stride 2 (padding 0 pads right/bottom by one, as the original)."""

    def __init__(self, ch, padding):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.padding == 0 else x)


class Upsample2D(nn.Module):
    """SD's upsampling: nearest-neighbour x2 (or to the skip's size when odd) then a 3x3 convolution."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


# ----------------------------------------------------------------------------------------------------------------
# attention

def split_heads(x, heads):
    """[B, N, h*d] -> [B, h, N, d] (a view)."""
    B, N, D = x.shape
    return x.view(B, N, heads, D // heads).transpose(1, 2)


def merge_heads(x):
    """[B, h, N, d] -> [B, N, h*d]."""
    B, h, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, h * d)


class AddedKVAttention(nn.Module):
    """IF's attention: image positions attend to text tokens and (unless only_cross_attention) to each other.

        q = W_q GN(x),   K = [W_k' c ; W_k GN(x)],   V = [W_v' c ; W_v GN(x)]
        out = x + W_o softmax(q K^T / sqrt(d) + mask) V
    c is group-normed first when cross_attention_norm == "group_norm" (32 groups, as IF). The text mask only hides
    text keys; image keys are never masked.
    """

    def __init__(self, ch, head_dim, text_dim, groups, only_cross_attention=False, cross_attention_norm=None):
        super().__init__()
        self.heads = ch // head_dim
        inner = self.heads * head_dim
        self.only_cross_attention = only_cross_attention
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-5)
        self.norm_cross = nn.GroupNorm(32, text_dim, eps=1e-5) if cross_attention_norm == "group_norm" else None
        self.to_q = nn.Linear(ch, inner)
        if not only_cross_attention:
            self.to_k = nn.Linear(ch, inner)
            self.to_v = nn.Linear(ch, inner)
        self.add_k_proj = nn.Linear(text_dim, inner)
        self.add_v_proj = nn.Linear(text_dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, ch)])

    def forward(self, x, c, text_bias=None):   # x: [B, C, H, W], c: [B, L, D_c], text_bias: [B, 1, 1, L] or None
        B, C, H, W = x.shape
        if self.norm_cross is not None:
            c = self.norm_cross(c.transpose(1, 2)).transpose(1, 2)
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2).contiguous() # [B, HW, C], read by 3 projections
        q = split_heads(self.to_q(h), self.heads)                             # [B, heads, HW, d]
        # BEGIN ASSIGN 6.3
        # HINT: keys/values = text projections (add_k_proj, add_v_proj) followed by the image's (to_k, to_v) on dim 2
        k = split_heads(self.add_k_proj(c), self.heads)                       # [B, heads, L, d]
        v = split_heads(self.add_v_proj(c), self.heads)
        if not self.only_cross_attention:
            k = torch.cat([k, split_heads(self.to_k(h), self.heads)], dim=2)  # [B, heads, L + HW, d]
            v = torch.cat([v, split_heads(self.to_v(h), self.heads)], dim=2)
            if text_bias is not None:                                         # image keys are never masked
                text_bias = F.pad(text_bias, (0, H * W))
        # END ASSIGN 6.3
        if text_bias is not None:
            text_bias = text_bias.to(q.dtype)
        out = self.to_out[0](merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=text_bias)))
        return x + out.transpose(1, 2).reshape(B, C, H, W)


class Attention(nn.Module):
    """SD's multi-head attention: softmax(q k^T / sqrt(d) + mask) v with q from x and k, v from ctx (x if None)."""

    def __init__(self, dim, heads, ctx_dim=None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(ctx_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, ctx=None, bias=None):                                # x: [B, N, D], ctx: [B, L, D_c]
        ctx = x if ctx is None else ctx
        q, k, v = (split_heads(f(t), self.heads) for f, t in ((self.to_q, x), (self.to_k, ctx), (self.to_v, ctx)))
        if bias is not None:
            bias = bias.to(q.dtype)
        return self.to_out[0](merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=bias)))


class GEGLU(nn.Module):
    """a * gelu(b) with [a, b] = proj(x)  (Shazeer 2020)."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        a, b = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(b)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        # net.1 is a no-op here (the original keeps a p=0 dropout there); it keeps the public key 'ff.net.2'.
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """x += attn1(LN(x)) ; x += attn2(LN(x), c) ; x += ff(LN(x)).

    With only_cross_attention the first attention also reads the text (and, as in the reference, without the
    text mask)."""

    def __init__(self, dim, heads, ctx_dim, only_cross_attention=False):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, ctx_dim if only_cross_attention else None)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, ctx_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, c, text_bias=None):                                 # x: [B, HW, D]
        # BEGIN ASSIGN 6.4
        # HINT: pre-norm residual sub-layers: x += attn1(norm1(x)); x += attn2(norm2(x), c, mask); x += ff(norm3(x))
        x = x + self.attn1(self.norm1(x), c if self.only_cross_attention else None)
        x = x + self.attn2(self.norm2(x), c, text_bias)
        x = x + self.ff(self.norm3(x))
        # END ASSIGN 6.4
        return x


class Transformer2DModel(nn.Module):
    """GN -> proj_in (1x1 conv, or linear when use_linear_projection) -> transformer blocks -> proj_out, + x."""

    def __init__(self, ch, heads, ctx_dim, groups, num_layers=1, use_linear_projection=False,
                 only_cross_attention=False):
        super().__init__()
        self.use_linear_projection = use_linear_projection
        inner = heads * (ch // heads)                                         # = ch when heads divides ch
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        layer = nn.Linear if use_linear_projection else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = layer(ch, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, ctx_dim, only_cross_attention) for _ in range(num_layers))
        self.proj_out = layer(inner, ch)

    def forward(self, x, c, text_bias=None):                                 # x: [B, C, H, W]
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.use_linear_projection:
            h = self.proj_in(h.view(B, C, H * W).transpose(1, 2))             # [B, HW, D]
        else:
            # [B, D, H, W] -> [B, HW, D], made contiguous once (else every residual sum keeps the strided layout)
            h = self.proj_in(h).flatten(2).transpose(1, 2).contiguous()
        for block in self.transformer_blocks:
            h = block(h, c, text_bias)
        if self.use_linear_projection:
            h = self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)
        else:
            h = self.proj_out(h.transpose(1, 2).reshape(B, -1, H, W))
        return x + h
