"""The probe model's tokenizer: word-level, digits as separate tokens, built with `tokenizers`.

Every whole word the benchmark generators emit is one token; everything else (numbers, UUIDs,
words with attached punctuation, anything unforeseen) falls back to single characters. The
model is a WordPiece model used as a word-level one:

    "The pass key is 71432."  ->  The | pass | key | is | 7 | ##1 | ##4 | ##3 | ##2 | ##.

* pre-tokenizer: split on whitespace only, so a word with attached punctuation or a UUID
  ("a3f2-bb01") stays one piece and decodes back without inserted spaces;
* vocabulary: the generators' words (never one containing a digit, so every digit is its own
  token), every single character they use, and its "##" continuation form;
* decoder: WordPiece without cleanup, so decode(encode(text)) equals text with its
  whitespace runs collapsed to single spaces;
* special tokens <pad> <unk> <s> </s>; <s> is prepended to every encoding (as Llama does).

UUIDs (`uuid_pairs=True`, the default) are the one exception to one-character pieces: a UUID is
copied out of a prompt token by token, and as 36 single characters from a 16-letter alphabet a
token of context matches hundreds of places among a hundred UUIDs. So each hex-digit pair of a UUID
is one token, 16 pairs and 4 dashes, as a byte-pair tokenizer would merge them (Llama 3's splits
hex into chunks of one to three characters). Numbers keep one token per digit. Done without
touching the pre-tokenizer: a normalizer rewrites the hex digits and dashes of every complete UUID
(8-4-4-4-12, lowercase, not inside a longer hex/word run) into 17 private-use characters
U+E000..U+E010, the vocabulary holds those, the 256 pairs of digits (and their "##" forms), and the
decoder maps them back, so decode(encode(text)) is still text:

    '"a3f2c1d0-bb01-..."'  ->  " | ##a3 | ##f2 | ##c1 | ##d0 | ##- | ##bb | ##01 | ...   (shown unmapped)

(Text that already holds characters U+E000..U+E010 decodes them as hex digits and dashes; the
generators never emit them.)

It is saved and loaded as a Hugging Face `PreTrainedTokenizerFast` (tokenizer.json +
tokenizer_config.json), so `AutoTokenizer.from_pretrained(path)` works.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
PREFIX = "##"
# Characters always in the vocabulary, whatever the generators emit: digits, ASCII letters
# (UUID hex digits, unforeseen names) and punctuation.
BASE_CHARS = string.digits + string.ascii_letters + string.punctuation
HEX_DIGITS = "0123456789abcdef"
# The private-use characters a UUID's hex digits and dashes are rewritten to (module docstring).
UUID_CHAR = {c: chr(0xE000 + i) for i, c in enumerate(HEX_DIGITS)}
UUID_DASH = "\ue010"
UUID_TEMPLATE = "x" * 8 + "-" + "x" * 4 + "-" + "x" * 4 + "-" + "x" * 4 + "-" + "x" * 12
_UUID_HEX = "[0-9a-f\ue000-\ue00f]"
_WORD = "0-9a-zA-Z_\\-\ue000-\ue010"  # characters that would continue a UUID's run


def _uuid_normalizer() -> normalizers.Normalizer:
    """Rewrite every complete UUID into UUID_CHAR / UUID_DASH, in 17 regex passes.

    First the dashes: a '-' whose surroundings, checked with fixed-width look-behinds and a
    look-ahead, make up a whole 8-4-4-4-12 lowercase UUID not glued to a longer word. Then each hex
    digit that is followed within its group by a rewritten dash (groups 1-4) or preceded within 12
    characters by one (group 5). The digit comes first in each pattern so the regex engine tries the
    alternatives only where it occurs: ~5 ms per 8K-token prompt, against ~30 ms for one full
    UUID check per digit.
    """

    def shape(part: str) -> str:
        return "".join(f"[-{UUID_DASH}]" if m == "-" else f"[0-9a-f]{{{len(m)}}}" for m in re.findall(r"x+|-", part))

    dash_alternatives = []
    for i, ch in enumerate(UUID_TEMPLATE):
        if ch == "-":
            before, after = shape(UUID_TEMPLATE[:i]), shape(UUID_TEMPLATE[i + 1 :])
            dash_alternatives.append(f"(?<=^{before}.|[^{_WORD}]{before}.)(?={after}(?![{_WORD}]))")
    passes = [normalizers.Replace(Regex("-(?:" + "|".join(dash_alternatives) + ")"), UUID_DASH)]
    last_group = "|".join(f"(?<={UUID_DASH}{_UUID_HEX}{{{k}}}.)" for k in range(12))
    for c in HEX_DIGITS:
        pattern = f"{c}(?:(?={_UUID_HEX}{{0,7}}{UUID_DASH})|{last_group})"
        passes.append(normalizers.Replace(Regex(pattern), UUID_CHAR[c]))
    return normalizers.Sequence(passes)


def uuid_pair_tokens() -> list[str]:
    """The 256 rewritten hex-digit pairs, the 16 singles and the dash, each plain and "##"-prefixed."""
    chars = [UUID_CHAR[c] for c in HEX_DIGITS]
    pieces = chars + [UUID_DASH] + [a + b for a in chars for b in chars]
    return pieces + [PREFIX + p for p in pieces]


def vocabulary(strings: Iterable[str]) -> list[str]:
    """The token list for `strings` (any texts: words, sentences, templates), in a fixed order.

    Order: special tokens, base characters, their "##" forms, then the extra characters and the
    words in first-seen order of a sorted pass, so the same input always gives the same ids.
    """
    chars: set[str] = set(BASE_CHARS)
    words: set[str] = set()
    for text in strings:
        if not isinstance(text, str):
            raise ValueError(f"vocabulary strings must be str, got {type(text).__name__}: {text!r}")
        for piece in text.split():
            chars.update(piece)
            word = piece.strip(string.punctuation)
            # Words with digits are never whole tokens: digits must stay separate tokens.
            if word and not any(c.isdigit() for c in word) and len(word) > 1:
                words.add(word)
    ordered_chars = list(BASE_CHARS) + sorted(chars - set(BASE_CHARS))
    tokens = list(SPECIAL_TOKENS) + ordered_chars + [PREFIX + c for c in ordered_chars]
    seen = set(tokens)
    for word in sorted(words):
        # A word can also appear glued after punctuation or another piece ("(word", "x-word").
        for tok in (word, PREFIX + word):
            if tok not in seen:
                seen.add(tok)
                tokens.append(tok)
    return tokens


def build_tokenizer(strings: Iterable[str], max_word_chars: int = 200, uuid_pairs: bool = True) -> PreTrainedTokenizerFast:
    """Build the probe tokenizer covering `strings` (see the module docstring)."""
    tokens = vocabulary(strings)
    if uuid_pairs:
        tokens += uuid_pair_tokens()
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=max_word_chars))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    decoder = decoders.WordPiece(prefix=PREFIX, cleanup=False)
    if uuid_pairs:
        tok.normalizer = _uuid_normalizer()
        back = [decoders.Replace(UUID_CHAR[c], c) for c in HEX_DIGITS] + [decoders.Replace(UUID_DASH, "-")]
        decoder = decoders.Sequence([decoder] + back)
    tok.decoder = decoder
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="left",
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )
    logger.info("probe tokenizer: %d tokens", len(tokens))
    return fast


def default_strings() -> list[str]:
    """Every string the benchmark generators can emit, from `benchmarks.suite.vocab`.

    A thin adapter over whatever that module exposes: every str, and every str inside a
    list/tuple/set/dict (keys and values), found among its public attributes.
    """
    from benchmarks.suite import vocab as vocab_module

    out: list[str] = []

    def collect(obj, depth=0):
        if isinstance(obj, str):
            out.append(obj)
        elif depth < 3 and isinstance(obj, dict):
            for k, v in obj.items():
                collect(k, depth + 1)
                collect(v, depth + 1)
        elif depth < 3 and isinstance(obj, (list, tuple, set, frozenset)):
            for v in obj:
                collect(v, depth + 1)

    for name in sorted(dir(vocab_module)):
        if not name.startswith("_"):
            collect(getattr(vocab_module, name))
    if not out:
        raise ValueError("benchmarks.suite.vocab exposes no strings to build the probe tokenizer from")
    return out


def load_tokenizer(path) -> PreTrainedTokenizerFast:
    """Load a saved probe tokenizer (a folder with tokenizer.json)."""
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Build the probe tokenizer from benchmarks.suite.vocab and save it.")
    parser.add_argument("--out", required=True, help="folder to save tokenizer.json and tokenizer_config.json in")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tok = build_tokenizer(default_strings())
    tok.save_pretrained(args.out)
    logger.info("saved %d-token tokenizer to %s", len(tok), args.out)


if __name__ == "__main__":
    main()
