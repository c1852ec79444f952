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

On the real T5 vocabulary the three steps alone give texts such as 'Ana', 'pub', 'das', 'ddy': a name, an English
word, a German article, and a word-internal piece that becomes two tokens once it starts a word. `find_identifier`
keeps the paper's sampling and adds the checks that make [V] what Sec. 4.1 asks for, a single token with a weak prior:
lower-case ASCII letters (IF lower-cases every prompt), ONE token of the range inside "a [V] dog", and not a word of
the prompt language (English, names, abbreviations) nor of T5's other languages (German, French, Romanian), from the
list in assets/common_short_words.txt. `screen_candidates` says why each refused text was refused.

    python -m tinybooth.rare_tokens --tokenizer DIR [--k 1] [--seed 0] [--range 5000 10000]
"""
import argparse
import random
import sys
from functools import lru_cache
from pathlib import Path

from .errors import UserError

PAPER_RANGE = (5000, 10000)
COMMON_WORDS = Path(__file__).parent / "assets" / "common_short_words.txt"
LANGUAGES = {"en": "English", "de": "German", "fr": "French", "ro": "Romanian"}


def check_range(tokenizer, id_range):
    """Refuse ranges that are empty or leave the learned vocabulary (ids 0..tokenizer.num_pieces-1)."""
    lo, hi = id_range
    if not (0 <= lo < hi <= tokenizer.num_pieces):
        raise UserError(f"id range [{lo}, {hi}) is outside this tokenizer's vocabulary of {tokenizer.num_pieces} "
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
        raise UserError(f"k={k}: the identifier is made of k >= 1 rare tokens (the paper uses 1 to 3)")
    # BEGIN ASSIGN 5.2
    # HINT: candidates = rare_token_candidates(...); refuse when fewer than k; "".join(candidates[:k])
    candidates = rare_token_candidates(tokenizer, id_range, max_chars, seed)
    if len(candidates) < k:
        raise UserError(f"only {len(candidates)} ids in {tuple(id_range)} de-tokenise to at most {max_chars} "
                         f"characters; widen the range or lower k (k={k})")
    return "".join(candidates[:k])
    # END ASSIGN 5.2


@lru_cache(maxsize=1)
def common_words(path=COMMON_WORDS):
    """{word: ('en', 'de', ...)}: the short words (1-3 letters) that are never identifiers, with their languages."""
    words = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            word, langs = line.split()
            words[word] = tuple(langs.split(","))
    return words


def why_not_identifier(tokenizer, text, id_range=PAPER_RANGE, lower_case=True):
    """None if text can be [V]; otherwise the reason it cannot, "what (detail)", in words a user reads."""
    if not (text.isascii() and text.isalpha()):
        return "not plain ASCII letters"
    if lower_case and not text.islower():
        return "upper case (IF lower-cases prompts: it would become another token)"
    before, after = len(tokenizer.tokenize("a")), len(tokenizer.tokenize("dog"))
    ids = tokenizer.tokenize(f"a {text} dog")[before:-after]   # [V]'s tokens inside a prompt
    if len(ids) != 1:
        return f"not one token in 'a [V] dog' ({len(ids)} tokens)"
    if not id_range[0] <= ids[0] < id_range[1]:
        return f"another token in 'a [V] dog', outside the range (id {ids[0]})"
    langs = common_words().get(text.lower())
    if langs:
        return "a common word (" + ", ".join(LANGUAGES[lang] for lang in langs) + ")"
    return None


def screen_candidates(tokenizer, id_range=PAPER_RANGE, seed=0, lower_case=True):
    """[(text, None or the reason it is refused)] for the paper's candidates, in their seeded random order."""
    return [(text, why_not_identifier(tokenizer, text, id_range, lower_case))
            for text in rare_token_candidates(tokenizer, id_range, seed=seed)]


def find_identifier(tokenizer, seed=0, lower_case=True, id_range=PAPER_RANGE):
    """[V]: the first of the paper's candidates (seeded) that is one token of the range in a prompt, lower-case ASCII
    letters (unless lower_case=False) and no common word. ValueError if none is."""
    for text in rare_token_candidates(tokenizer, id_range, seed=seed):
        if why_not_identifier(tokenizer, text, id_range, lower_case) is None:
            return text
    raise UserError(f"none of the ids {id_range[0]}..{id_range[1] - 1} of this tokenizer gives a one-token, "
                     f"non-word identifier; widen the range or pass --identifier")


def count_tokens(tokenizer, text):
    """How many tokens text becomes (without start/end/padding): "sks" is 1 CLIP token, a rare identifier ideally
    stays 1-3 tokens."""
    return len(tokenizer.tokenize(text))


def load_tokenizer(path):
    """T5Tokenizer for a directory with spiece.model, CLIPTokenizer for vocab.json + merges.txt or CLIP's .txt.gz."""
    from .text import T5Tokenizer
    from .clip import CLIP_VOCAB_GZ, CLIPTokenizer
    path = Path(path)
    if (path / "spiece.model").exists():
        return T5Tokenizer.from_pretrained(path)
    if (path / "vocab.json").exists() or (path / CLIP_VOCAB_GZ).exists():
        return CLIPTokenizer.from_pretrained(path)
    raise UserError(f"'{path}' holds no tokenizer: expected spiece.model (T5, DeepFloyd IF's tokenizer/) or "
                     f"vocab.json + merges.txt / {CLIP_VOCAB_GZ} (CLIP, Stable Diffusion's tokenizer/)")


def main(argv=None):
    p = argparse.ArgumentParser(description="The paper's rare-token identifier search (Sec. 4.1).")
    p.add_argument("--tokenizer", required=True, help="a tokenizer directory (spiece.model, or CLIP's BPE files)")
    p.add_argument("--k", type=int, default=1,
                   help="1: one rare token with the checks of find_identifier; 2-3: the paper's k texts joined")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--range", type=int, nargs=2, default=PAPER_RANGE, metavar=("LO", "HI"),
                   help="token ids to sample from, HI excluded (paper: 5000 10000)")
    args = p.parse_args(argv)
    try:
        tokenizer, id_range = load_tokenizer(args.tokenizer), tuple(args.range)
        if args.k > 1:
            identifier = find_rare_identifier(tokenizer, k=args.k, id_range=id_range, seed=args.seed)
            print(identifier)
            print(f"# {count_tokens(tokenizer, identifier)} token(s) in this tokenizer (k={args.k} texts joined)")
            return
        identifier = find_identifier(tokenizer, args.seed, id_range=id_range)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(identifier)
    print_screening(screen_candidates(tokenizer, id_range, args.seed), identifier)


def print_screening(screened, identifier, shown=10):
    """What the search refused before [V] (and why), a tally of the reasons, and the next accepted candidates."""
    first = [text for text, _ in screened].index(identifier)
    print(f"# one token in 'a {identifier} dog'; {first} candidate(s) before it were refused:")
    for text, reason in screened[:first][:shown]:
        print(f"#   {text!r:8} {reason}")
    tally = {}
    for _, reason in screened:
        key = reason.split(" (")[0] if reason else "accepted"
        tally[key] = tally.get(key, 0) + 1
    print(f"# of all {len(screened)} candidates (<= 3 characters):")
    for reason, n in sorted(tally.items(), key=lambda kv: -kv[1]):
        print(f"#   {n:5d} {reason}")
    later = [text for text, reason in screened[first + 1:] if reason is None][:shown]
    print(f"# next accepted: {', '.join(later)}")


if __name__ == "__main__":
    main()
