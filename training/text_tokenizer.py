"""A BERT-style WordPiece tokenizer built in-process from captions with `tokenizers`, so text towers train offline.

`tokenizers`' own `WordPieceTrainer` is not deterministic (its merges break ties through hash maps: measured, three
runs on the same 84 captions gave three different vocabularies), and every process of a run — and a resumed run —
must tokenize alike. So the vocabulary here is counted, not merged: the captions are normalised and pre-tokenised
by the BERT normaliser / pre-tokeniser, and the vocabulary is every word seen at least `min_frequency` times (the
`max_words` most frequent, ties alphabetically) plus every character alone and as a `##` continuation, so an unseen
word still splits into known pieces instead of becoming `[UNK]`.

The layout follows `bert-base-uncased`: `[PAD]` 0, `[UNK]` 100, `[CLS]` 101, `[SEP]` 102, `[MASK]` 103, `.` 1012 and
`?` 1029 — Grounding DINO finds the phrases of a prompt through exactly these ids (its `SPECIAL_TOKENS`), and the
other slots below 1030 hold the learnt pieces, then `[unused…]` fillers. The result is a stock
`PreTrainedTokenizerFast`, saved and loaded without dinoforge.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["BERT_SPECIAL_IDS", "build_wordpiece_tokenizer", "saved_tokenizer"]

# bert-base-uncased ids that other code relies on (Grounding DINO's SPECIAL_TOKENS are 101, 102, 1012, 1029).
BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
_MIN_VOCAB = 1030


def _pipeline(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def build_wordpiece_tokenizer(
    texts: Iterable[str], *, min_frequency: int = 1, max_words: int = 30000, model_max_length: int = 64
) -> PreTrainedTokenizerFast:
    """A lower-casing WordPiece tokenizer (`[CLS] text [SEP]`) whose vocabulary comes from `texts` (see the module
    docstring); deterministic: the same texts give the same ids in any process."""
    counter = _pipeline(Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]")))
    words: Counter[str] = Counter()
    chars: set[str] = set()
    for text in texts:
        normalized = counter.normalizer.normalize_str(text)
        for word, _ in counter.pre_tokenizer.pre_tokenize_str(normalized):
            words[word] += 1
            chars.update(word)
    if not words:
        raise ValueError("cannot build a tokenizer from no text: the caption source gave no words")
    kept = sorted((w for w, n in words.items() if n >= min_frequency), key=lambda w: (-words[w], w))[:max_words]
    pieces = sorted(set(kept) | chars | {f"##{c}" for c in chars})
    fixed = {token: i for token, i in BERT_SPECIAL_IDS.items()}
    pieces = [p for p in pieces if p not in fixed]
    size = max(_MIN_VOCAB, len(fixed) + len(pieces))
    slots: list[str | None] = [None] * size
    for token, i in fixed.items():
        slots[i] = token
    free = (i for i, s in enumerate(slots) if s is None)
    for piece, i in zip(pieces, free):
        slots[i] = piece
    unused = 0
    for i, s in enumerate(slots):
        if s is None:
            slots[i] = f"[unused{unused}]"
            unused += 1
    vocab = {token: i for i, token in enumerate(slots)}
    tokenizer = _pipeline(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100)))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", BERT_SPECIAL_IDS["[CLS]"]), ("[SEP]", BERT_SPECIAL_IDS["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=model_max_length, do_lower_case=True,
    )


def saved_tokenizer(folder: str | os.PathLike, build: Callable[[], PreTrainedTokenizerFast]) -> PreTrainedTokenizerFast:
    """The tokenizer saved in `folder` (a resumed run), else `build()` saved there. Every process of a run builds
    the same one (it is deterministic) and writes a private copy; the first rename into place wins."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder))
    tokenizer = build()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
