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

Preprocessing is part of each metric: the published image processors (transformers' CLIPImageProcessor and the
facebook/dino-vits16 preprocessor_config.json) are reproduced exactly with PIL, see ImagePreprocessing below.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from . import checkpoint
from .text import CLIP_ACT, CLIPEncoder, CLIPTextEncoder

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
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; expected one of {list(ACTIVATIONS)}")
        if not isinstance(self.image_size, int) or not isinstance(self.patch_size, int):
            raise ValueError(f"image_size={self.image_size!r} and patch_size={self.patch_size!r} must be single "
                             f"integers (square images and patches)")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2  # N

    @classmethod
    def from_clip_config(cls, config):
        """The vision tower of a transformers CLIPModel config.json (vision_config inside, projection_dim on top)."""
        if config.get("model_type") != "clip":
            raise ValueError(f"model_type={config.get('model_type')!r}: expected a CLIPModel config.json "
                             f"(model_type 'clip', e.g. openai/clip-vit-base-patch32)")
        vision = {**CLIP_VISION_DEFAULTS, **(config.get("vision_config") or {}),
                  **(config.get("vision_config_dict") or {})}  # old exports repeat the settings in *_dict (wins)
        return cls(projection_dim=config.get("projection_dim", 512),
                   **{k: vision[k] for k in CLIP_VISION_DEFAULTS})

    @classmethod
    def from_vit_config(cls, config):
        """A transformers ViTModel config.json (model_type 'vit', e.g. facebook/dino-vits16)."""
        if config.get("model_type") != "vit":
            raise ValueError(f"model_type={config.get('model_type')!r}: expected a ViTModel config.json "
                             f"(model_type 'vit', e.g. facebook/dino-vits16)")
        vit = {**VIT_DEFAULTS, **config}
        if vit["qkv_bias"] is not True:
            raise ValueError(f"qkv_bias={vit['qkv_bias']!r} is not supported (the DINO checkpoints have q/k/v biases)")
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
        raise ValueError(f"pixel_values are {tuple(pixel_values.shape[-2:])} but this encoder takes "
                         f"{config.image_size}x{config.image_size} images; run encoder.preprocess(images) first")


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing: exactly what the published image processors do (transformers' PIL backend), written with PIL

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImagePreprocessing:
    """Image -> normalised [3, S, S] tensor, the way the reference image processor prepares it.

    shortest_edge=True (CLIPImageProcessor): resize the shorter side to S keeping the aspect ratio (the longer side
    becomes int(S * long / short)), then take the central S x S crop (top = (h - S) // 2, left = (w - S) // 2).
    shortest_edge=False (ViTImageProcessor, facebook/dino-vits16): squash the whole image to S x S.
    Then x / 255 and (x - mean) / std per channel. Resizing is PIL's (antialiased) filter on the uint8 RGB image;
    transparent images are first composited on white, as the reference's convert_to_rgb does.
    """
    size: int
    shortest_edge: bool
    resample: int
    mean: tuple
    std: tuple

    def __call__(self, images):
        """images: a PIL image, a list of them, or a float tensor [B, 3, H, W] in [0, 1] (quantised to 8 bits first,
        as saving it to PNG would). Returns [B, 3, S, S] float32."""
        if isinstance(images, torch.Tensor):
            images = tensor_to_pil(images)
        elif isinstance(images, Image.Image):
            images = [images]
        return torch.stack([self.one(img) for img in images])

    def one(self, img):
        if "A" in img.getbands() or img.info.get("transparency") is not None:  # transparency: composite on white
            img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
        img = img.convert("RGB")
        S = self.size
        if self.shortest_edge:
            w, h = img.size
            short, long = min(w, h), max(w, h)
            new_long = int(S * long / short)
            img = img.resize((S, new_long) if w <= h else (new_long, S), resample=self.resample)  # PIL: (w, h)
            w, h = img.size
            top, left = (h - S) // 2, (w - S) // 2
            img = img.crop((left, top, left + S, top + S))
        else:
            img = img.resize((S, S), resample=self.resample)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) * np.float32(1 / 255)).permute(2, 0, 1)  # [3, S, S]
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (x - mean) / std


def tensor_to_pil(x):
    """[B, 3, H, W] floats in [0, 1] -> list of 8-bit PIL images (round to nearest, like saving a PNG)."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images as a [B, 3, H, W] tensor in [0, 1], got shape {tuple(x.shape)}")
    a = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(im) for im in a]


# ----------------------------------------------------------------------------------------------------------------
# CLIP ViT-B/32: vision tower + visual projection of a CLIPModel checkpoint. Its transformer blocks are the CLIP
# text encoder's (tinybooth.text.CLIPEncoder: same tensor names, same pre-norm math), run without the causal mask.

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
        self.preprocess = ImagePreprocessing(self.c.image_size, shortest_edge=True, resample=Image.BICUBIC,
                                             mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)

    @classmethod
    def from_config(cls, config):
        return cls(config)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        config, state = read_clip_half(path, ("vision_model.", "visual_projection."), dtype, device)
        with torch.device("meta"):
            model = cls.from_config(config)
        return checkpoint.load_into(model, state, name=f"CLIPVisionEncoder in '{path}'").eval()

    def save_pretrained(self, path):
        """config.json (the CLIPModel config) + model.safetensors with the vision tensors only."""
        return checkpoint.save_pretrained(self, path, self.config, "model")

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

    c = tinybooth.text.CLIPTextEncoder(ids) [B, L, D] (the `text_model.*` tensors). CLIP pools a prompt at its
    end-of-text token and maps it into the joint image-text space with `text_projection.weight` [P, D] (no bias),
    which only the CLIPModel file has. State dict = the text half of that file, public names unchanged. The
    tokenizer is tinybooth.text.CLIPTokenizer on the same directory (vocab.json + merges.txt).
    """

    def __init__(self, config):
        if config.get("model_type") != "clip":
            raise ValueError(f"model_type={config.get('model_type')!r}: expected a CLIPModel config.json "
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
        from .text import CLIPTokenizer
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
        # facebook/dino-vits16's preprocessor_config.json: ViTFeatureExtractor, size 224 (squashed, no crop),
        # resample 2 (bilinear), mean = std = 0.5. (The original DINO repository evaluates with ImageNet mean/std
        # and resize 256 + crop 224; the published Hugging Face processor, which we match, does not.)
        self.preprocess = ImagePreprocessing(self.c.image_size, shortest_edge=False, resample=Image.BILINEAR,
                                             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

    @classmethod
    def from_config(cls, config):
        return cls(config)

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        return checkpoint.load_pretrained(cls, path, "model", dtype=dtype, device=device)

    def save_pretrained(self, path):
        return checkpoint.save_pretrained(self, path, self.config, "model")

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
