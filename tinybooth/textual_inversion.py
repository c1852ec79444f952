"""Textual Inversion (Gal et al., 2022): the baseline DreamBooth is compared with in its Table 1.

Textual Inversion personalises a text-to-image model without changing it: every weight of the U-Net and of the
text encoder stays frozen, and only the input embedding v of one new word [V] (one row of the encoder's token
table) is learned from the subject's photos, with the plain denoising loss, eq. (1) of the DreamBooth paper:

    v* = argmin_v  E_{x, eps, t} [ w_t || x_hat(alpha_t x + sigma_t eps, c(v)) - x ||^2 ],   c(v) = T5("a [V] star")

There is no prior term: the model cannot drift, since nothing in it changes. What TI can express is limited to
what the frozen model can already draw from *some* text input; DreamBooth (tinybooth.train) also moves the U-Net,
so it can bind [V] to a subject the model has never drawn (the toy subject's teal/pink split: no toy-world object
has two colours).

Here v is the row `token_id` of the T5's `shared.weight` [vocab, D]: that table is the only trainable tensor, and a
gradient hook zeroes the gradient of every other row, so AdamW (without weight decay) leaves them exactly as they
were. The encoder's own forward then "swaps in" v wherever the identifier's token appears.
"""
import torch

from tinybooth.dreambooth import dreambooth_loss


def identifier_token(tokenizer, identifier):
    """The id of the identifier's single token (a T5 tokenizer gives it followed by </s>)."""
    ids = tokenizer.tokenize(identifier)
    if len(ids) != 1:
        raise ValueError(f"identifier '{identifier}' is {len(ids)} tokens ({ids}); Textual Inversion learns one "
                         f"embedding row, so pick an identifier that is a single token")
    return ids[0]


def learn_only_row(encoder, token_id, init_token_id=None):
    """Freeze the encoder except row token_id of its token table (optionally copied from row init_token_id first,
    e.g. the class noun's, as Gal et al. initialise from a coarse descriptor). Returns the table (the one tensor
    to optimise) and the hook's handle (remove it to make the encoder ordinary again)."""
    encoder.requires_grad_(False)
    table = encoder.shared.weight  # [vocab, D]
    if init_token_id is not None:
        with torch.no_grad():
            table[token_id] = table[init_token_id]
    keep = torch.zeros(table.shape[0], 1, device=table.device)  # [vocab, 1]: 1 for the learned row only
    keep[token_id] = 1.0
    table.requires_grad_(True)
    handle = table.register_hook(lambda grad: grad * keep)  # dL/dE[i] = 0 for every other row i
    return table, handle


def encode(encoder, tokenizer, prompts, device, grad=False):
    """Text embeddings c [N, L, D] of prompts as IF's pipeline makes them (lower-cased, padding masked in T5)."""
    ids, mask = tokenizer([p.lower().strip() for p in prompts])  # [N, L] each
    with torch.set_grad_enabled(grad):
        return encoder(ids.to(device), attention_mask=mask.to(device))


def train_embedding(unet, schedule, encoder, tokenizer, x_inst, prompt, token_id, steps, lr, batch_size, seed,
                    init_token_id=None):
    """Learn row token_id of the encoder's token table on the subject photos x_inst [N, 3, R, R] with eq. (1)
    (no prior term; U-Net and the rest of T5 frozen). Returns the per-step losses; the encoder keeps v*."""
    device = x_inst.device
    unet.requires_grad_(False).eval()
    table, handle = learn_only_row(encoder, token_id, init_token_id)
    before = table.detach().clone()
    optimizer = torch.optim.AdamW([table], lr=lr, weight_decay=0.0)  # no decay: the other rows must not move
    generator = torch.Generator(device).manual_seed(seed)
    losses = []
    for _ in range(steps):
        i = torch.randint(len(x_inst), (batch_size,), generator=generator, device=device).cpu()
        c = encode(encoder, tokenizer, [prompt], device, grad=True).expand(batch_size, -1, -1)  # [B, L, D]
        loss, _ = dreambooth_loss(unet, schedule, x_inst[i], c, None, None, 0.0, generator)  # eq. (1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    handle.remove()
    table.requires_grad_(False)
    moved = (table.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert moved in ([token_id], []), f"rows {moved} changed; only row {token_id} may be learned"
    return losses
