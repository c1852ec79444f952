"""Checks, with diffusers, that a folder weights_download.py leaves loads with `DiffusionPipeline.from_pretrained`.

Run with the reference venv:  /work/refenv/bin/python tests/reference/check_model_index_in_diffusers.py
For IF stage I and Stable Diffusion: a tiny random pipeline is saved, its model_index.json is made to name the
components the public repos name but weights_download.py does not fetch (safety_checker, feature_extractor,
watermarker), as the downloaded file does; from_pretrained then raises OSError. After weights_download's
null_unfetched_components it loads, without those components. Prints one line per step; exits 1 on a surprise.
Writes nothing in the repository (a temporary folder).
"""
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

from diffusers import (AutoencoderKL, DDPMScheduler, DiffusionPipeline, IFPipeline, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT / "tests" / "fixtures" / "text"
spec = importlib.util.spec_from_file_location("weights_download", ROOT / "weights_download.py")
wd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wd)

UNET = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            norm_num_groups=4, attention_head_dim=2)
PUBLISHED = {  # what the public model_index.json files name beyond the fetched components
    "if": {"safety_checker": ["deepfloyd_if.safety_checker", "IFSafetyChecker"],
           "feature_extractor": ["transformers", "CLIPImageProcessor"],
           "watermarker": ["deepfloyd_if.watermark", "IFWatermarker"]},
    "sd": {"safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
           "feature_extractor": ["transformers", "CLIPImageProcessor"]},
}


def tiny_pipeline(kind):
    if kind == "if":
        return IFPipeline(tokenizer=T5Tokenizer.from_pretrained(TEXT / "spm"),
                          text_encoder=T5EncoderModel.from_pretrained(TEXT / "t5_gated"),
                          unet=UNet2DConditionModel(in_channels=3, out_channels=6, **UNET), scheduler=DDPMScheduler(),
                          safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=4, max_position_embeddings=77))
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    tokenizer = CLIPTokenizer.from_pretrained(TEXT / "clip_small")
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer,
                                   unet=UNet2DConditionModel(in_channels=4, out_channels=4, **UNET),
                                   scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def check(kind, tmp):
    folder = Path(tmp) / kind
    tiny_pipeline(kind).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(PUBLISHED[kind], requires_safety_checker=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    try:
        DiffusionPipeline.from_pretrained(folder)
        print(f"{kind}: loaded with the published model_index.json: unexpected")
        return False
    except (OSError, ValueError, ImportError) as e:
        print(f"{kind}: published model_index.json -> {type(e).__name__}: {str(e)[:100]}")
    fetched = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    dropped = wd.null_unfetched_components(folder, fetched)
    pipe = DiffusionPipeline.from_pretrained(folder)
    missing = [k for k in PUBLISHED[kind] if getattr(pipe, k, None) is not None]
    print(f"{kind}: after null_unfetched_components (set to null: {dropped}) -> {type(pipe).__name__} loads")
    return sorted(dropped) == sorted(PUBLISHED[kind]) and not missing


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        ok = [check(kind, tmp) for kind in ("if", "sd")]
    sys.exit(0 if all(ok) else 1)
