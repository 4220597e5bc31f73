"""Hugging Face tokenizer directories for text: RoBERTa's layout puts <mask> last, not at 4."""
import dataclasses
import os

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, PreprocessConfig, TextSettings
from pipeline.tokenizer import check_specials, read_tokenizer_json
from tests.helpers import write_bytes

LINES = [f"the quick brown fox number {i} jumps over the lazy dog" for i in range(200)]


def _roberta_style(with_mask: bool = True):
    """Byte-level BPE with <s>, <pad>, </s>, <unk> = 0..3 and <mask> added after the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(LINES, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if with_mask:
        tok.add_special_tokens(["<mask>"])
    return tok


def _save_hf_dir(tok, d, with_mask: bool = True):
    from transformers import PreTrainedTokenizerFast
    specials = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    if with_mask:
        specials["mask_token"] = "<mask>"
    PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(str(d))
    return str(d)


def test_check_specials_accepts_mask_anywhere_and_requires_it():
    from pipeline.tokenizer import train_tokenizer
    tok = _roberta_style()
    assert check_specials(tok) == tok.get_vocab_size() - 1 == 400
    assert check_specials(train_tokenizer(LINES, vocab_size=300)) == 4  # ours keep <mask> = 4
    with pytest.raises(ValueError, match="no '<mask>' token"):
        check_specials(_roberta_style(with_mask=False))


def test_read_tokenizer_json_from_hf_directories(tmp_path):
    from tokenizers import Tokenizer
    tok = _roberta_style()
    d = _save_hf_dir(tok, tmp_path / "hf")
    assert os.path.isfile(os.path.join(d, "tokenizer.json"))
    want = tok.encode("the quick brown fox", add_special_tokens=False).ids
    got = Tokenizer.from_str(read_tokenizer_json(d))
    assert got.encode("the quick brown fox", add_special_tokens=False).ids == want
    assert check_specials(got) == 400
    # Only vocab.json + merges.txt (the older RoBERTa / GPT-2 layout): built through transformers.
    vm = tmp_path / "vm"
    vm.mkdir()
    tok.model.save(str(vm))
    assert sorted(os.listdir(vm)) == ["merges.txt", "vocab.json"]
    got = Tokenizer.from_str(read_tokenizer_json(str(vm)))
    assert got.encode("the quick brown fox", add_special_tokens=False).ids == want
    assert check_specials(got) == 400
    with pytest.raises(ValueError, match="without tokenizer.json"):
        read_tokenizer_json(str(tmp_path))


def test_preprocess_with_hf_tokenizer_dir(ray_local, tmp_path):
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    from pipeline.ingest import run
    from pipeline.train.launch import frontend_from_manifest
    tok = _roberta_style()
    d = _save_hf_dir(tok, tmp_path / "hf")
    write_bytes(str(tmp_path / "raw" / "a.txt"), "\n".join(LINES[:50]).encode())
    cfg = PreprocessConfig(modality="text", input=str(tmp_path / "raw"), output=str(tmp_path / "out"),
                           tokenizer=d, text=TextSettings(max_length=16))
    manifest = run(cfg)
    s = manifest["settings"]
    assert s["special_ids"] == {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 400}
    assert s["vocab_size"] == 401
    assert frontend_from_manifest(manifest) == {"vocab_size": 401, "mask_id": 400}
    # OUT/tokenizer.json is the directory's tokenizer; the shards hold its ids.
    out_tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert out_tok.to_str() == Tokenizer.from_file(os.path.join(d, "tokenizer.json")).to_str()
    ids = pq.read_table(str(tmp_path / "out" / "shards")).column("input_ids").to_pylist()
    text = "".join(tok.decode(r[1:-1]) for r in ids)
    assert text == "".join(LINES[:50])


def test_preprocess_refuses_tokenizer_without_mask(tmp_path):
    from pipeline.ingest import run
    d = _save_hf_dir(_roberta_style(with_mask=False), tmp_path / "hf", with_mask=False)
    write_bytes(str(tmp_path / "raw" / "a.txt"), b"hello world\n")
    cfg = PreprocessConfig(modality="text", input=str(tmp_path / "raw"), output=str(tmp_path / "out"), tokenizer=d)
    with pytest.raises(ConfigError, match="tokenizer: .*no '<mask>' token"):
        run(cfg)  # refused before any Ray work


def test_frontend_mask_id_validated():
    from pipeline.model.config import FrontEndConfig
    assert FrontEndConfig().mask_id == 4
    for bad in (2, 300):
        with pytest.raises(ConfigError, match="frontend.mask_id"):
            FrontEndConfig(vocab_size=300, mask_id=bad)
    assert FrontEndConfig(vocab_size=300, mask_id=299).mask_id == 299


def _text_cfg(mask_id, bert_corrupt):
    from tests.test_model import tiny
    cfg = tiny("text", "d2v1")
    return dataclasses.replace(cfg, frontend=dataclasses.replace(cfg.frontend, mask_id=mask_id),
                               mask=dataclasses.replace(cfg.mask, prob=0.3, length=1, bert_corrupt=bert_corrupt))


def test_text_d2v1_masks_with_the_configured_mask_id():
    from pipeline.model.data2vec import Data2Vec, draw_masks
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 299, (4, 40))  # never the RoBERTa-style <mask> (299)
    cfg = _text_cfg(299, bert_corrupt=False)
    m = draw_masks(cfg, 4, 40, np.random.default_rng(1), input_ids=ids)
    out = m["input_ids_masked"]
    assert m["mask"].any() and (out[m["mask"]] == 299).all() and (out[~m["mask"]] == ids[~m["mask"]]).all()
    cfg_b = _text_cfg(299, bert_corrupt=True)  # 80/10/10: random ids are real tokens (4 … 298)
    mb = draw_masks(cfg_b, 4, 40, np.random.default_rng(1), input_ids=ids)
    changed = mb["mask"] & (mb["input_ids_masked"] != ids)
    assert (mb["input_ids_masked"] == 299).any()
    assert ((mb["input_ids_masked"][changed] >= 4) & (mb["input_ids_masked"][changed] <= 299)).all()
    # The 1.0 loss covers exactly the steps the student sees as the configured <mask>.
    torch.manual_seed(0)
    model = Data2Vec(cfg_b)
    batch = {"input_ids": torch.from_numpy(ids), "input_ids_masked": torch.from_numpy(mb["input_ids_masked"])}
    out = model(batch, torch.from_numpy(mb["mask"]))
    assert out.num_masked == int((mb["mask"] & (mb["input_ids_masked"] == 299)).sum())
