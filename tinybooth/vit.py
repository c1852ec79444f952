"""The image encoders of the paper's evaluation metrics: CLIP ViT-B/32 and DINO ViT-S/16 (paper Sec. 4.1, "Evaluation
Metrics").

DreamBooth scores subject fidelity by comparing embeddings of generated and real images of the subject:

    CLIP-I   CLIP image embeddings (Radford et al. 2021), public weights openai/clip-vit-base-patch32
    DINO     self-supervised ViT-S/16 CLS embeddings (Caron et al. 2021), public weights facebook/dino-vits16

and prompt fidelity (CLIP-T) with the CLIP embedding of the prompt (CLIPTextEmbedder below: tinybooth.text's CLIP
text encoder plus the CLIPModel's `text_projection`). Both image encoders are the Vision Transformer of Dosovitskiy et al. (2021):

    z_0 = [x_cls; E p_1; ...; E p_N] + E_pos        p_i: the i-th P x P patch, E a linear map (a stride-P conv)
    z_l' = z_{l-1} + MSA(LN(z_{l-1}))               pre-norm transformer block, l = 1..L
    z_l  = z_l'    + MLP(LN(z_l'))
    y    = LN(z_L[0])                               the CLS token after a final layer norm

CLIP adds a layer norm before the first block (its public name keeps the typo: `pre_layrnorm`), uses quick_gelu
(x * sigmoid(1.702 x)) in the MLP, and maps y into the joint image-text space with `visual_projection` (no bias).
DINO uses exact gelu and returns y itself. The two public checkpoints name the same tensors differently; each class
keeps its checkpoint's names, so a state dict loads one to one:

    CLIP (transformers CLIPModel, model.safetensors)    DINO (transformers ViTModel, pytorch_model.bin)
    vision_model.embeddings.class_embedding   [D]       embeddings.cls_token                      [1, 1, D]
    vision_model.embeddings.patch_embedding   (no bias) embeddings.patch_embeddings.projection    (bias)
    vision_model.embeddings.position_embedding.weight   embeddings.position_embeddings            [1, N+1, D]
    vision_model.pre_layrnorm                           -
    vision_model.encoder.layers.l.layer_norm1           encoder.layer.l.layernorm_before
    vision_model.encoder.layers.l.self_attn.q_proj      encoder.layer.l.attention.attention.query  (k, v alike)
    vision_model.encoder.layers.l.self_attn.out_proj    encoder.layer.l.attention.output.dense
    vision_model.encoder.layers.l.layer_norm2           encoder.layer.l.layernorm_after
    vision_model.encoder.layers.l.mlp.fc1 / fc2         encoder.layer.l.intermediate.dense / output.dense
    vision_model.post_layernorm                         layernorm
    visual_projection                                   -

Preprocessing is part of each metric: `from_pretrained` reads the folder's preprocessor_config.json (size, crop,
resample, rescale, mean, std) and follows it as transformers' image processors do (tinybooth.image_preprocessing);
without that file, CLIP uses CLIPImageProcessor's defaults and DINO ViTImageProcessor's (squash, bilinear, mean =
std = 0.5), both at the model's image_size.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from . import checkpoint
from .image_preprocessing import (IMAGENET_STANDARD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocessing,
                                  read_preprocessing, write_preprocessing)
from .clip import CLIPEncoder
from .clip import CLIP_ACT, CLIPTextEncoder
from .errors import UserError

ACTIVATIONS = CLIP_ACT  # quick_gelu (CLIP: x * sigmoid(1.702 x)) and gelu (DINO: exact x * Phi(x))


# ----------------------------------------------------------------------------------------------------------------
# Configs: built from the public config.json, with the reference library's defaults for keys the file leaves out
# (openai/clip-vit-base-patch32's config.json spells out almost nothing about the vision tower).

CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)
VIT_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    num_channels=3, image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-12,
                    qkv_bias=True)


@dataclass(frozen=True)
class ViTConfig:
    hidden_size: int          # D
    intermediate_size: int    # MLP width
    num_hidden_layers: int    # L
    num_attention_heads: int
    num_channels: int
    image_size: int           # the square input side the position embeddings were trained for
    patch_size: int           # P
    hidden_act: str
    layer_norm_eps: float
    projection_dim: int = 0   # CLIP's joint embedding size; 0 = no projection (DINO)

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(f"hidden_act={self.hidden_act!r} is not supported; expected one of {list(ACTIVATIONS)}")
        if not isinstance(self.image_size, int) or not isinstance(self.patch_size, int):
            raise UserError(f"image_size={self.image_size!r} and patch_size={self.patch_size!r} must be single "
                             f"integers (square images and patches)")
        if self.image_size % self.patch_size:
            raise UserError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise UserError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2  # N

    @classmethod
    def from_clip_config(cls, config):
        """The vision tower of a transformers CLIPModel config.json (vision_config inside, projection_dim on top)."""
        if config.get("model_type") != "clip":
            raise UserError(f"model_type={config.get('model_type')!r}: expected a CLIPModel config.json "
                             f"(model_type 'clip', e.g. openai/clip-vit-base-patch32)")
        vision = {**CLIP_VISION_DEFAULTS, **(config.get("vision_config") or {}),
                  **(config.get("vision_config_dict") or {})}  # old exports repeat the settings in *_dict (wins)
        return cls(projection_dim=config.get("projection_dim", 512),
                   **{k: vision[k] for k in CLIP_VISION_DEFAULTS})

    @classmethod
    def from_vit_config(cls, config):
        """A transformers ViTModel config.json (model_type 'vit', e.g. facebook/dino-vits16)."""
        if config.get("model_type") != "vit":
            raise UserError(f"model_type={config.get('model_type')!r}: expected a ViTModel config.json "
                             f"(model_type 'vit', e.g. facebook/dino-vits16)")
        vit = {**VIT_DEFAULTS, **config}
        if vit["qkv_bias"] is not True:
            raise UserError(f"qkv_bias={vit['qkv_bias']!r} is not supported (the DINO checkpoints have q/k/v biases)")
        return cls(**{k: vit[k] for k in VIT_DEFAULTS if k != "qkv_bias"})


# ----------------------------------------------------------------------------------------------------------------
# The ViT math: the patch embedding (both encoders) and DINO's attention (CLIP's blocks come from tinybooth.text)

def multi_head_attention(x, q_proj, k_proj, v_proj, out_proj, num_heads):
    """MSA(x) = concat_h softmax(Q_h K_h^T / sqrt(d_h)) V_h, then the output projection. No mask: every patch sees
    every patch (unlike CLIP's causal text encoder)."""
    B, L, D = x.shape
    # [B, L, D] -> [B, nh, L, hs]
    q, k, v = (proj(x).view(B, L, num_heads, D // num_heads).transpose(1, 2) for proj in (q_proj, k_proj, v_proj))
    y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hs)) v   [B, nh, L, hs]
    return out_proj(y.transpose(1, 2).reshape(B, L, D))  # [B, nh, L, hs] -> [B, L, D]


def embed_patches(pixel_values, patch_conv, cls_token, position_embeddings):
    """z_0 = [x_cls; E p_1; ...; E p_N] + E_pos (Dosovitskiy et al. eq. 1).

    pixel_values [B, C, H, W]; patch_conv: the stride-P conv computing E p_i; cls_token [D]; position_embeddings
    [N+1, D]. Returns [B, N+1, D].
    """
    # BEGIN ASSIGN 9.1
    # HINT: patches = conv(x) flattened to [B, N, D]; prepend cls_token (expanded to [B, 1, D]); add position_embeddings
    patches = patch_conv(pixel_values).flatten(2).transpose(1, 2)  # [B, D, H/P, W/P] -> [B, N, D]
    cls = cls_token.reshape(1, 1, -1).expand(patches.shape[0], 1, -1)  # [B, 1, D]
    return torch.cat([cls, patches], dim=1) + position_embeddings  # [B, N+1, D]
    # END ASSIGN 9.1


def check_image_size(pixel_values, config):
    if tuple(pixel_values.shape[-2:]) != (config.image_size, config.image_size):
        raise UserError(f"pixel_values are {tuple(pixel_values.shape[-2:])} but this encoder takes "
                         f"{config.image_size}x{config.image_size} images; run encoder.preprocess(images) first")


# ----------------------------------------------------------------------------------------------------------------
# CLIP ViT-B/32: vision tower + visual projection of a CLIPModel checkpoint. Its transformer blocks are the CLIP
# text encoder's (tinybooth.clip.CLIPEncoder: same tensor names, same pre-norm math), run without the causal mask.

class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding(c.num_patches + 1, c.hidden_size)

    def forward(self, pixel_values):
        return embed_patches(pixel_values, self.patch_embedding, self.class_embedding, self.position_embedding.weight)


class CLIPVisionTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = CLIPEncoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixel_values):
        z = self.pre_layrnorm(self.embeddings(pixel_values))  # [B, N+1, D]
        everything = torch.ones(1, 1, z.shape[1], z.shape[1], dtype=torch.bool, device=z.device)
        for layer in self.encoder.layers:
            z = layer(z, everything)  # no causal mask: every patch attends to every patch
        return self.post_layernorm(z[:, 0])  # y = LN(z_L[0])   [B, D]


def read_clip_half(path, prefixes, dtype=None, device=None):
    """(config.json, the tensors whose names start with `prefixes`) of a transformers CLIPModel directory.

    The file holds both towers; each side keeps its own. Old exports also carry `*.embeddings.position_ids` (the
    buffer 0..N), which we never need: positions are simply all rows of the position embedding, in order."""
    path = Path(path)
    if not path.is_dir():
        raise checkpoint.CheckpointError(f"CLIP directory '{path}' does not exist. Download the weights first: "
                                         f"{checkpoint.DOWNLOAD_HINT}")
    config = checkpoint.read_config(path)
    state = checkpoint.read_state_dict(checkpoint.find_weight_files(path, "model"), dtype, device or "cpu")
    return config, {k: v for k, v in state.items() if k.startswith(prefixes) and not k.endswith("position_ids")}


class CLIPVisionEncoder(nn.Module):
    """CLIP image embedding: visual_projection(LN(z_L[0])), the vector CLIP-I and CLIP-T compare by cosine.

    Loads the vision half of a transformers CLIPModel directory (openai/clip-vit-base-patch32): config.json (the
    whole CLIPModel config) and the `vision_model.*` + `visual_projection.weight` tensors of model.safetensors
    (or pytorch_model.bin). The text half of the same file is tinybooth.text's business and is skipped here.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.c = ViTConfig.from_clip_config(config)
        self.vision_model = CLIPVisionTransformer(self.c)
        self.visual_projection = nn.Linear(self.c.hidden_size, self.c.projection_dim, bias=False)
        # CLIPImageProcessor's defaults at this model's size; from_pretrained follows preprocessor_config.json
        S = self.c.image_size
        self.preprocess = ImagePreprocessing(size=S, crop=(S, S), resample=Image.BICUBIC, rescale=1 / 255,
                                             mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)

    @classmethod
    def from_config(cls, config):
        return cls(config)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        config, state = read_clip_half(path, ("vision_model.", "visual_projection."), dtype, device)
        with torch.device("meta"):
            model = cls.from_config(config)
        model.preprocess = read_preprocessing(Path(path), "clip", model.preprocess, model.c.image_size)
        return checkpoint.load_into(model, state, name=f"CLIPVisionEncoder in '{path}'").eval()

    def save_pretrained(self, path):
        """config.json (the CLIPModel config) + model.safetensors with the vision tensors only, and
        preprocessor_config.json."""
        out = checkpoint.save_pretrained(self, path, self.config, "model")
        write_preprocessing(Path(path), self.preprocess, "clip")
        return out

    def forward(self, pixel_values):
        """pixel_values [B, 3, S, S] (from self.preprocess) -> image embeddings [B, projection_dim] (not normalised)."""
        check_image_size(pixel_values, self.c)
        pixel_values = pixel_values.to(self.visual_projection.weight.dtype)
        return self.visual_projection(self.vision_model(pixel_values))

    @torch.no_grad()
    def embed(self, images):
        """PIL images (or a [B, 3, H, W] tensor in [0, 1]) -> [B, projection_dim], preprocessing included."""
        x = self.preprocess(images).to(self.visual_projection.weight.device)
        return self(x).float()


class CLIPTextEmbedder(CLIPTextEncoder):
    """CLIP text embedding t(p) = text_projection(c[eos]) of a CLIPModel directory: CLIP-T's text side.

    c = tinybooth.clip.CLIPTextEncoder(ids) [B, L, D] (the `text_model.*` tensors). CLIP pools a prompt at its
    end-of-text token and maps it into the joint image-text space with `text_projection.weight` [P, D] (no bias),
    which only the CLIPModel file has. State dict = the text half of that file, public names unchanged. The
    tokenizer is tinybooth.clip.CLIPTokenizer on the same directory (vocab.json + merges.txt).
    """

    def __init__(self, config):
        if config.get("model_type") != "clip":
            raise UserError(f"model_type={config.get('model_type')!r}: expected a CLIPModel config.json "
                             f"(model_type 'clip', e.g. openai/clip-vit-base-patch32)")
        text_config = {**(config.get("text_config") or {}), **(config.get("text_config_dict") or {})}
        super().__init__({**text_config, "model_type": "clip_text_model"})
        self.config = config
        self.text_projection = nn.Linear(self.c.hidden_size, config.get("projection_dim", 512), bias=False)
        self.tokenizer = None  # from_pretrained sets it

    @classmethod
    def from_config(cls, config):
        return cls(config)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        from .clip import CLIPTokenizer
        config, state = read_clip_half(path, ("text_model.", "text_projection."), dtype, device)
        with torch.device("meta"):
            model = cls.from_config(config)
        checkpoint.load_into(model, state, name=f"CLIPTextEmbedder in '{path}'")
        model.tokenizer = CLIPTokenizer.from_pretrained(path)
        return model.eval()

    def project(self, input_ids, eos_id):
        """input_ids [B, L] -> t [B, P]: the hidden state at the first eos_id of each row, projected."""
        c = self(input_ids)  # [B, L, D]
        end = (input_ids == eos_id).int().argmax(dim=1)  # first end-of-text position per row   [B]
        return self.text_projection(c[torch.arange(len(c), device=c.device), end])  # [B, P]

    @torch.no_grad()
    def embed(self, texts):
        """Prompts -> t [B, P] (not normalised), tokenised to the model's max_position_embeddings."""
        ids, _ = self.tokenizer(texts, max_length=self.c.max_position_embeddings)
        return self.project(ids.to(self.text_projection.weight.device), self.tokenizer.eos_id).float()


# ----------------------------------------------------------------------------------------------------------------
# DINO ViT-S/16: a transformers ViTModel without pooler; the embedding is the CLS token after the final layer norm

class ViTSelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)


class ViTSelfOutput(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)


class ViTAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.num_heads = c.num_attention_heads
        self.attention = ViTSelfAttention(c)
        self.output = ViTSelfOutput(c)

    def forward(self, x):
        a = self.attention
        return multi_head_attention(x, a.query, a.key, a.value, self.output.dense, self.num_heads)


class ViTDense(nn.Module):
    """`intermediate.dense` (D -> MLP width) and `output.dense` (back to D): the two halves of the MLP."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class ViTLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.act = ACTIVATIONS[c.hidden_act]
        self.layernorm_before = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attention = ViTAttention(c)
        self.layernorm_after = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.intermediate = ViTDense(c.hidden_size, c.intermediate_size)
        self.output = ViTDense(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        x = x + self.attention(self.layernorm_before(x))  # z' = z + MSA(LN(z))
        mlp = self.output.dense(self.act(self.intermediate.dense(self.layernorm_after(x))))
        return x + mlp                                     # z  = z' + MLP(LN(z'))


class ViTEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer = nn.ModuleList(ViTLayer(c) for _ in range(c.num_hidden_layers))


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.projection = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)


class ViTEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.patch_embeddings = ViTPatchEmbeddings(c)
        self.position_embeddings = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.hidden_size))

    def forward(self, pixel_values):
        return embed_patches(pixel_values, self.patch_embeddings.projection, self.cls_token[0, 0],
                             self.position_embeddings[0])


class DINOEncoder(nn.Module):
    """DINO image embedding: LN(z_L[0]), the CLS token of a self-supervised ViT (no pooler, no projection).

    Loads a transformers ViTModel directory (facebook/dino-vits16: config.json + pytorch_model.bin, read with
    torch.load(weights_only=True) by tinybooth.checkpoint; model.safetensors is preferred when present).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.c = ViTConfig.from_vit_config(config)
        self.embeddings = ViTEmbeddings(self.c)
        self.encoder = ViTEncoder(self.c)
        self.layernorm = nn.LayerNorm(self.c.hidden_size, eps=self.c.layer_norm_eps)
        # without a preprocessor_config.json: ViTImageProcessor's defaults at this model's size (squashed, no crop,
        # bilinear, mean = std = 0.5); from_pretrained follows the folder's file
        S = self.c.image_size
        self.preprocess = ImagePreprocessing(size=(S, S), crop=None, resample=Image.BILINEAR, rescale=1 / 255,
                                             mean=IMAGENET_STANDARD, std=IMAGENET_STANDARD)

    @classmethod
    def from_config(cls, config):
        return cls(config)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        model = checkpoint.load_pretrained(cls, path, "model", dtype=dtype, device=device)
        model.preprocess = read_preprocessing(Path(path), "vit", model.preprocess, model.c.image_size)
        return model

    def save_pretrained(self, path):
        out = checkpoint.save_pretrained(self, path, self.config, "model")
        write_preprocessing(Path(path), self.preprocess, "vit")
        return out

    def forward(self, pixel_values):
        """pixel_values [B, 3, S, S] (from self.preprocess) -> CLS embeddings [B, D]."""
        check_image_size(pixel_values, self.c)
        z = self.embeddings(pixel_values.to(self.layernorm.weight.dtype))  # [B, N+1, D]
        for layer in self.encoder.layer:
            z = layer(z)
        return self.layernorm(z)[:, 0]  # y = LN(z_L)[0]   [B, D]

    @torch.no_grad()
    def embed(self, images):
        """PIL images (or a [B, 3, H, W] tensor in [0, 1]) -> [B, D], preprocessing included."""
        x = self.preprocess(images).to(self.layernorm.weight.device)
        return self(x).float()
