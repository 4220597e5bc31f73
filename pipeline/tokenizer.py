"""Sub-word tokenizer: trained on the corpus with Hugging Face `tokenizers`, RoBERTa specials.

<s>=0, <pad>=1, </s>=2, <unk>=3 are fixed so model code can rely on them (RoBERTa's order).
<mask> must exist but may have any other id: tokenizers trained here put it at 4, RoBERTa's own
(and other Hugging Face tokenizer directories) at the end of the vocabulary (50264 for roberta);
the data's manifest records it (settings.special_ids.mask) and the model reads it from
FrontEndConfig.mask_id. No Ray here.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
BOS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = range(5)  # MASK_ID: tokenizers trained here only


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


def check_specials(tok) -> int:
    """Fail loudly if a (possibly user-supplied) tokenizer does not carry our special ids:
    <s>, <pad>, </s>, <unk> must be 0-3 and <mask> must exist (any other id). Returns <mask>'s id."""
    for i, s in enumerate(SPECIALS[:4]):
        got = tok.token_to_id(s)
        if got != i:
            raise ValueError(f"tokenizer: special token {s!r} must have id {i}, has {got}")
    mask = tok.token_to_id("<mask>")
    if mask is None:
        raise ValueError("tokenizer: has no '<mask>' token, which data2vec text masking needs; "
                         "add it (e.g. tokenizer.add_special_tokens(['<mask>'])) and save it again")
    return mask


def read_tokenizer_json(path: str) -> str:
    """The tokenizer at `path` (local path or URI) as `tokenizers` JSON: a tokenizer.json file, or
    a Hugging Face tokenizer directory — its tokenizer.json, or, when it only has vocab.json +
    merges.txt (GPT-2/RoBERTa byte-level BPE), the tokenizer `transformers` builds from them."""
    import os
    import tempfile

    import pyarrow.fs as pafs

    from pipeline import storage

    fs, root = storage.resolve(path)
    if not storage.is_dir(fs, root):
        return storage.read_text(fs, root)
    if storage.exists(fs, f"{root}/tokenizer.json"):
        return storage.read_text(fs, f"{root}/tokenizer.json")
    if not (storage.exists(fs, f"{root}/vocab.json") and storage.exists(fs, f"{root}/merges.txt")):
        raise ValueError(f"{path!r} is a directory without tokenizer.json (or vocab.json + merges.txt)")
    with tempfile.TemporaryDirectory() as tmp:  # transformers reads local folders only
        for info in fs.get_file_info(pafs.FileSelector(root)):
            if info.type == pafs.FileType.File and info.base_name.endswith((".json", ".txt")):
                with fs.open_input_stream(info.path) as src, open(os.path.join(tmp, info.base_name), "wb") as dst:
                    dst.write(src.read())
        from transformers import AutoTokenizer, RobertaTokenizer
        try:  # tokenizer_config.json / config.json name the class
            tok = AutoTokenizer.from_pretrained(tmp)
        except (ValueError, OSError, KeyError):  # bare vocab.json + merges.txt: RoBERTa's format
            tok = RobertaTokenizer.from_pretrained(tmp)
        return tok.backend_tokenizer.to_str()


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
