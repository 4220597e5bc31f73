"""Sub-word tokenizer: trained on the corpus with Hugging Face `tokenizers`, RoBERTa specials.

Special ids are fixed so model code can rely on them: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4
(RoBERTa's order). No Ray here.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
BOS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = range(5)


def train_tokenizer(texts: Iterable[str], kind: str = "bpe", vocab_size: int = 8000):
    """Train a byte-level BPE (lossless round trip) or a Unigram tokenizer on `texts`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=SPECIALS, unk_token="<unk>", show_progress=False)
    else:
        raise ValueError(f"tokenizer kind must be 'bpe' or 'unigram', got {kind!r}")
    tok.train_from_iterator(texts, trainer=trainer)
    check_specials(tok)
    return tok


def check_specials(tok) -> None:
    """Fail loudly if a (possibly user-supplied) tokenizer does not carry our special ids."""
    for i, s in enumerate(SPECIALS):
        got = tok.token_to_id(s)
        if got != i:
            raise ValueError(f"tokenizer: special token {s!r} must have id {i}, has {got}")


def load_tokenizer(path: str):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    check_specials(tok)
    return tok


def chunk_ids(ids: list[int], max_length: int) -> Iterator[np.ndarray]:
    """Token ids of one sample → rows of ≤ max_length ids, each framed as <s> … </s>."""
    body = max_length - 2
    for start in range(0, max(len(ids), 1), body):
        piece = ids[start: start + body]
        yield np.asarray([BOS_ID, *piece, EOS_ID], dtype=np.int32)


def pack_rows(rows: list[np.ndarray], max_length: int) -> list[np.ndarray]:
    """Concatenate consecutive framed rows (<s> a </s><s> b </s>…) up to max_length each."""
    out, cur = [], []
    size = 0
    for r in rows:
        if cur and size + len(r) > max_length:
            out.append(np.concatenate(cur))
            cur, size = [], 0
        cur.append(r)
        size += len(r)
    if cur:
        out.append(np.concatenate(cur))
    return out
