"""The subject identifier [V]: a rare token of the text encoder's vocabulary (paper Sec. 4.1, "Rare-token
Identifiers").

DreamBooth fine-tunes the model on prompts "a [V] dog". [V] should carry as little prior meaning as possible, so that
fine-tuning need not first unlearn it: a common English word ("dog", "blue") or a random string of letters that the
tokenizer splits into frequent single-letter tokens both come with a strong prior. The paper's recipe:

    1. sample token ids uniformly without replacement from a range of the vocabulary ({5000, ..., 10000} of T5-XXL's
       SentencePiece vocabulary: rare enough, yet real pieces the encoder has embeddings for),
    2. de-tokenise each id and keep it if its text has at most 3 Unicode characters and no space,
    3. concatenate k = 1..3 kept texts: that string is the identifier [V] (e.g. "sks").

Both tokenizers of tinybooth.text work: for T5 a piece is de-tokenised by SentencePiece (its word mark '▁' dropped),
for CLIP a BPE token by the byte decoder (its end-of-word mark '</w>' dropped). `count_tokens` shows how a candidate
such as "sks" is split again when it appears in a prompt.

    python -m tinybooth.rare_tokens --tokenizer DIR [--k 1] [--seed 0] [--range 5000 10000]
"""
import argparse
import random
from pathlib import Path

PAPER_RANGE = (5000, 10000)


def check_range(tokenizer, id_range):
    """Refuse ranges that are empty or leave the learned vocabulary (ids 0..tokenizer.num_pieces-1)."""
    lo, hi = id_range
    if not (0 <= lo < hi <= tokenizer.num_pieces):
        raise ValueError(f"id range [{lo}, {hi}) is outside this tokenizer's vocabulary of {tokenizer.num_pieces} "
                         f"pieces (ids 0..{tokenizer.num_pieces - 1}); pick 0 <= lo < hi <= {tokenizer.num_pieces}, "
                         f"e.g. --range {tokenizer.num_pieces // 3} {2 * tokenizer.num_pieces // 3}")


def token_text(tokenizer, token_id):
    """The de-tokenised text of one id: no '▁' (SentencePiece) or '</w>' (CLIP BPE) word mark, no outer spaces."""
    return tokenizer.decode([token_id]).strip()


def is_identifier_text(text, max_chars=3):
    """The paper's filter, 1..max_chars Unicode characters and no whitespace, plus ours: printable, at least one
    letter (so [V] reads as a word in a prompt: no "''" or "..."), and no U+FFFD (a BPE token holding part of a
    multi-byte character de-tokenises to that replacement mark)."""
    return (1 <= len(text) <= max_chars and text.isprintable() and not any(ch.isspace() for ch in text)
            and any(ch.isalpha() for ch in text) and "\ufffd" not in text)


def rare_token_candidates(tokenizer, id_range=PAPER_RANGE, max_chars=3, seed=0):
    """Texts of the ids of id_range in a uniformly random order (sampling without replacement, seeded), keeping
    those that pass is_identifier_text; a text already kept (two ids with the same text) is not repeated."""
    check_range(tokenizer, id_range)
    # BEGIN ASSIGN 5.1
    # HINT: ids = random.Random(seed).sample(range(lo, hi), hi - lo); keep token_text(tokenizer, i) if it passes
    lo, hi = id_range
    ids = random.Random(seed).sample(range(lo, hi), hi - lo)  # uniform, without replacement
    texts = (token_text(tokenizer, i) for i in ids)
    return list(dict.fromkeys(t for t in texts if is_identifier_text(t, max_chars)))  # ordered, no duplicates
    # END ASSIGN 5.1


def find_rare_identifier(tokenizer, k=1, id_range=PAPER_RANGE, max_chars=3, seed=0):
    """[V]: the first k rare-token candidates concatenated (k = 1..3 in the paper), reproducible from seed."""
    if k < 1:
        raise ValueError(f"k={k}: the identifier is made of k >= 1 rare tokens (the paper uses 1 to 3)")
    # BEGIN ASSIGN 5.2
    # HINT: candidates = rare_token_candidates(...); refuse when fewer than k; "".join(candidates[:k])
    candidates = rare_token_candidates(tokenizer, id_range, max_chars, seed)
    if len(candidates) < k:
        raise ValueError(f"only {len(candidates)} ids in {tuple(id_range)} de-tokenise to at most {max_chars} "
                         f"characters; widen the range or lower k (k={k})")
    return "".join(candidates[:k])
    # END ASSIGN 5.2


def count_tokens(tokenizer, text):
    """How many tokens text becomes (without start/end/padding): "sks" is 1 CLIP token, a rare identifier ideally
    stays 1-3 tokens."""
    return len(tokenizer.tokenize(text))


def load_tokenizer(path):
    """T5Tokenizer for a directory with spiece.model, CLIPTokenizer for vocab.json + merges.txt or CLIP's .txt.gz."""
    from .text import CLIP_VOCAB_GZ, CLIPTokenizer, T5Tokenizer
    path = Path(path)
    if (path / "spiece.model").exists():
        return T5Tokenizer.from_pretrained(path)
    if (path / "vocab.json").exists() or (path / CLIP_VOCAB_GZ).exists():
        return CLIPTokenizer.from_pretrained(path)
    raise ValueError(f"'{path}' holds no tokenizer: expected spiece.model (T5, DeepFloyd IF's tokenizer/) or "
                     f"vocab.json + merges.txt / {CLIP_VOCAB_GZ} (CLIP, Stable Diffusion's tokenizer/)")


def main(argv=None):
    p = argparse.ArgumentParser(description="The paper's rare-token identifier search (Sec. 4.1).")
    p.add_argument("--tokenizer", required=True, help="a tokenizer directory (spiece.model, or CLIP's BPE files)")
    p.add_argument("--k", type=int, default=1, help="number of rare tokens joined into the identifier (1-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--range", type=int, nargs=2, default=PAPER_RANGE, metavar=("LO", "HI"),
                   help="token ids to sample from, HI excluded (paper: 5000 10000)")
    args = p.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    identifier = find_rare_identifier(tokenizer, k=args.k, id_range=tuple(args.range), seed=args.seed)
    print(identifier)
    print(f"# {count_tokens(tokenizer, identifier)} token(s) in this tokenizer; next candidates:")
    for text in rare_token_candidates(tokenizer, tuple(args.range), seed=args.seed)[args.k:args.k + 10]:
        print(f"#   {text!r}: {count_tokens(tokenizer, text)} token(s)")


if __name__ == "__main__":
    main()
