"""Image preprocessing of the evaluation encoders, read from the folder's preprocessor_config.json.

Preprocessing is part of each metric: DINO and CLIP-I compare embeddings of images prepared exactly as the encoder
was trained to see them. The public folders say how in `preprocessor_config.json`, read by transformers' image
processors; we follow the same steps with PIL, in the same order:

    1. convert to RGB (transparent images composited on white, as transformers 5's convert_to_rgb does; 4.x
       drops the alpha channel)
    2. resize   "size": {"shortest_edge": S}  shorter side -> S, longer -> int(S * long / short)   (CLIP, Bit)
                        {"height": H, "width": W}  squash to H x W                             (ViT, DINO)
                with the PIL filter numbered by "resample" (0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box,
                5 hamming: transformers' PILImageResampling uses PIL's numbers)
    3. centre crop "crop_size" {"height", "width"} if "do_center_crop" (CLIP, Bit; ViTImageProcessor never crops):
                top = (h - H) // 2, left = (w - W) // 2, zero-padded where the crop is larger than the image
    4. x * rescale_factor (1/255), then (x - image_mean) / image_std per channel

Keys the file leaves out take the defaults of its processor class (image_processor_type or feature_extractor_type),
as transformers does; an int "size" means H = W = size for ViT and the shortest edge for CLIP and Bit.
"""
import json
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .errors import UserError

PREPROCESSOR_FILE = "preprocessor_config.json"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD_MEAN = _STD: ViTImageProcessor's default

# the defaults of transformers' ViTImageProcessor and CLIPImageProcessor (BitImageProcessor, DINOv2's, has CLIP's)
VIT_DEFAULTS = dict(do_resize=True, size={"height": 224, "width": 224}, resample=Image.BILINEAR, do_center_crop=False,
                    do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=IMAGENET_STANDARD,
                    image_std=IMAGENET_STANDARD)
CLIP_DEFAULTS = dict(do_resize=True, size={"shortest_edge": 224}, resample=Image.BICUBIC, do_center_crop=True,
                     crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                     do_normalize=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
PROCESSORS = {"ViTImageProcessor": "vit", "ViTFeatureExtractor": "vit", "CLIPImageProcessor": "clip",
              "CLIPFeatureExtractor": "clip", "BitImageProcessor": "clip"}


@dataclass(frozen=True)
class ImagePreprocessing:
    """Image -> normalised [3, H, W] tensor, the way the reference image processor prepares it.

    size: int S (shorter side -> S, aspect kept), (H, W) (squash), or None (no resize); crop: (H, W) centre crop or
    None; resample: PIL filter number; rescale: factor or None; mean, std: per channel, or None (no normalisation).
    """
    size: object
    crop: object
    resample: int
    rescale: object
    mean: object
    std: object

    @property
    def output_size(self):
        """(H, W) of every output, or None when it depends on the image (shortest-edge resize without a crop)."""
        return self.crop or (self.size if isinstance(self.size, tuple) else None)

    def __call__(self, images):
        """images: a PIL image, a list of them, or a float tensor [B, 3, H, W] in [0, 1] (quantised to 8 bits first,
        as saving it to PNG would). Returns [B, 3, H, W] float32."""
        if isinstance(images, torch.Tensor):
            images = tensor_to_pil(images)
        elif isinstance(images, Image.Image):
            images = [images]
        return torch.stack([self.one(img) for img in images])

    def one(self, img):
        if "A" in img.getbands() or img.info.get("transparency") is not None:  # transparency: composite on white
            img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
        img = img.convert("RGB")
        if self.size is not None:
            img = img.resize(self.resized_wh(*img.size), resample=self.resample)
        if self.crop is not None:
            H, W = self.crop
            w, h = img.size
            top, left = (h - H) // 2, (w - W) // 2
            img = img.crop((left, top, left + W, top + H))  # PIL fills outside the image with 0, as transformers pads
        a = np.asarray(img, dtype=np.float64)  # [H, W, 3], 0..255
        if self.rescale is not None:
            a = a * self.rescale  # x / 255, in float64 as transformers' rescale, then float32
        x = torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1)  # [3, H, W]
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
            x = (x - mean) / std
        return x

    def resized_wh(self, w, h):
        """PIL's (width, height) after the resize step."""
        if isinstance(self.size, tuple):
            H, W = self.size
            return W, H
        S, short, long = self.size, min(w, h), max(w, h)
        new_long = int(S * long / short)
        return (S, new_long) if w <= h else (new_long, S)


def tensor_to_pil(x):
    """[B, 3, H, W] floats in [0, 1] -> list of 8-bit PIL images (round to nearest, like saving a PNG)."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise UserError(f"expected images as a [B, 3, H, W] tensor in [0, 1], got shape {tuple(x.shape)}")
    a = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(im) for im in a]


def _hw(value, shortest_edge_if_int, where):
    """transformers' get_size_dict: an int, [H, W] or a dict -> S (shortest edge) or (H, W)."""
    if isinstance(value, int):
        return value if shortest_edge_if_int else (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return tuple(value)
    if isinstance(value, dict) and set(value) == {"shortest_edge"}:
        return value["shortest_edge"]
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        return value["height"], value["width"]
    raise UserError(f"{where}={value!r} is not supported; expected an int, {{'shortest_edge': S}} or "
                     f"{{'height': H, 'width': W}}")


def _per_channel(value):
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3


def preprocessing_from_config(config, kind, name=PREPROCESSOR_FILE):
    """An ImagePreprocessing from a preprocessor_config.json dict; kind 'vit' or 'clip' is the processor class used
    when the file names none (the encoder's own: DINO's ViTImageProcessor, CLIP's CLIPImageProcessor)."""
    cls = config.get("image_processor_type") or config.get("feature_extractor_type")
    if cls is not None and cls not in PROCESSORS:
        raise UserError(f"{name}: image processor {cls!r} is not supported; expected one of {sorted(PROCESSORS)}")
    kind = PROCESSORS.get(cls, kind)
    c = {**(VIT_DEFAULTS if kind == "vit" else CLIP_DEFAULTS), **config}
    size = _hw(c["size"], kind == "clip", f"{name}: size") if c["do_resize"] else None
    if kind == "vit" and not isinstance(size, (tuple, type(None))):
        raise UserError(f"{name}: a ViT image processor resizes to {{'height': H, 'width': W}}, not {c['size']!r}")
    crop = _hw(c["crop_size"], False, f"{name}: crop_size") if kind == "clip" and c["do_center_crop"] else None
    return ImagePreprocessing(size=size, crop=crop, resample=int(c["resample"]),
                              rescale=float(c["rescale_factor"]) if c["do_rescale"] else None,
                              mean=_per_channel(c["image_mean"]) if c["do_normalize"] else None,
                              std=_per_channel(c["image_std"]) if c["do_normalize"] else None)


def read_preprocessing(path, kind, default, image_size):
    """The preprocessing of an encoder folder: its preprocessor_config.json if there is one, else `default`.

    The output must be image_size x image_size, the size the encoder's position embeddings were trained for."""
    file = path / PREPROCESSOR_FILE
    if not file.is_file():
        return default
    pre = preprocessing_from_config(json.loads(file.read_text()), kind, name=str(file))
    if pre.output_size != (image_size, image_size):
        raise UserError(f"'{file}' prepares images of size {pre.output_size or 'varying with the image'} but the "
                         f"encoder takes {image_size}x{image_size}; fix size/crop_size in that file")
    return pre


def preprocessing_to_config(pre, kind):
    """The preprocessor_config.json dict transformers reads back as the same steps (kind 'vit' or 'clip')."""
    hw = lambda v: {"height": v[0], "width": v[1]}  # noqa: E731
    config = {"image_processor_type": "ViTImageProcessor" if kind == "vit" else "CLIPImageProcessor",
              "do_resize": pre.size is not None, "resample": pre.resample, "do_rescale": pre.rescale is not None,
              "do_normalize": pre.mean is not None, "do_convert_rgb": True}
    if pre.size is not None:
        config["size"] = hw(pre.size) if isinstance(pre.size, tuple) else {"shortest_edge": pre.size}
    if kind == "clip":
        config.update(do_center_crop=pre.crop is not None, **({"crop_size": hw(pre.crop)} if pre.crop else {}))
    if pre.rescale is not None:
        config["rescale_factor"] = pre.rescale
    if pre.mean is not None:
        config.update(image_mean=list(pre.mean), image_std=list(pre.std))
    return config


def write_preprocessing(path, pre, kind):
    (path / PREPROCESSOR_FILE).write_text(json.dumps(preprocessing_to_config(pre, kind), indent=2) + "\n")
