"""Textual Inversion (tinybooth.textual_inversion): only the identifier's embedding row may learn."""
import pytest
import torch

from tinybooth import data, models, text, textual_inversion as ti
from tinybooth.schedule import DiscreteSchedule
from tinybooth.unet import UNet


def test_textual_inversion_changes_only_the_identifier_row():
    tokenizer = text.T5Tokenizer.from_pretrained(models.TOY_BASE / "tokenizer")
    encoder = text.T5Encoder.from_pretrained(models.TOY_BASE / "text_encoder")
    unet = UNet.from_pretrained(models.TOY_BASE / "unet")
    schedule = DiscreteSchedule.from_pretrained(models.TOY_BASE / "scheduler")
    x = data.load_instance_images(models.TOY_SUBJECT, 32)[:2]
    token_id = ti.identifier_token(tokenizer, "fw")
    table_before = encoder.shared.weight.detach().clone()
    unet_before = {k: v.clone() for k, v in unet.state_dict().items()}
    layers_before = {k: v.clone() for k, v in encoder.state_dict().items() if k != "shared.weight"}
    losses = ti.train_embedding(unet, schedule, encoder, tokenizer, x, "a fw star", token_id, steps=2, lr=1e-2,
                                batch_size=2, seed=0)
    assert all(torch.isfinite(torch.tensor(losses))), f"non-finite Textual Inversion loss: {losses}"
    changed = (encoder.shared.weight != table_before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [token_id], f"embedding rows {changed} changed; only the identifier's row {token_id} may"
    assert all(torch.equal(unet_before[k], v) for k, v in unet.state_dict().items()), "the U-Net must stay frozen"
    assert all(torch.equal(layers_before[k], v) for k, v in encoder.state_dict().items() if k != "shared.weight"), \
        "the T5's layers must stay frozen"


def test_identifier_of_several_tokens_is_refused():
    tokenizer = text.T5Tokenizer.from_pretrained(models.TOY_BASE / "tokenizer")
    with pytest.raises(ValueError, match="single token"):
        ti.identifier_token(tokenizer, "a lux star")
