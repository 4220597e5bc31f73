"""Exported Hugging Face models reproduce our hidden states (fp32, max abs diff <= 1e-4)."""

import pytest
import torch

from pipeline.export_hf import NotRepresentable, export
from pipeline.model.data2vec import Data2Vec
from tests.test_model import tiny


def _perturbed(cfg):
    torch.manual_seed(0)
    m = Data2Vec(cfg).eval()
    with torch.no_grad():  # non-trivial biases / norms everywhere, as after training
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _ours(m, inputs):
    fe = m.frontend
    x, pad = fe.local(inputs)
    h = fe.context(x, pad)
    h, hpad = fe.prepend(h, pad)
    out, _ = m.encoder(h, hpad)
    return out


@pytest.mark.parametrize("modality,mode", [("audio", "d2v2"), ("text", "d2v2"), ("image", "d2v1")])
def test_export_matches_hidden_states(tmp_path, modality, mode):
    from transformers import AutoModel
    m = _perturbed(tiny(modality, mode))
    export(m, str(tmp_path / "hf"))
    hf = AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if modality == "audio":
            wav = torch.randn(2, 8000, generator=g)
            ref, got = _ours(m, {"audio": wav}), hf(wav).last_hidden_state
        elif modality == "text":
            ids = torch.randint(5, 300, (2, 20), generator=g)
            ref, got = _ours(m, {"input_ids": ids}), hf(ids).last_hidden_state
        else:
            img = torch.randn(2, 3, 28, 28, generator=g)
            ref, got = _ours(m, {"image": img}), hf(img).last_hidden_state
    assert ref.shape == got.shape
    assert (ref - got).abs().max().item() <= 1e-4


def test_export_refuses_post_ln_image(tmp_path):
    m = Data2Vec(tiny("image", "d2v2"))
    with pytest.raises(NotRepresentable, match="pre-LN"):
        export(m, str(tmp_path / "hf"))
