"""Reference-parity checks of the student/teacher step (fairseq data2vec 1.0 / 2.0 behaviour)."""
import dataclasses

import numpy as np
import pytest
import torch

from pipeline.recipes import preset
from pipeline.model.data2vec import Data2Vec
from pipeline.model.objective import regression_loss
from pipeline.tokenizer import MASK_ID
from tests.test_model import batch_for, masks_for, tiny

CASES = [(m, v) for m in ("image", "audio", "text") for v in ("d2v1", "d2v2")]


def _encoder_input(model, batch, mask, perturb=None):
    """The student encoder's input (first call of model.encoder) for one forward pass; `perturb`
    edits the student's local features (B, T, D) before the context part."""
    seen = []
    hook = model.encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    local = model.frontend.local
    if perturb is not None:
        model.frontend.local = lambda b: (lambda x, pad: (perturb(x), pad))(*local(b))
    try:
        torch.manual_seed(0)
        model(batch, mask)
    finally:
        hook.remove()
        model.frontend.local = local
    return seen[0]


@pytest.mark.parametrize("modality,mode", CASES)
def test_masked_steps_do_not_reach_the_student_encoder(modality, mode):
    """Changing only the masked steps' local features (or, for text 1.0, the original tokens at
    masked steps) leaves the student encoder's input unchanged; changing kept steps does not."""
    torch.manual_seed(0)
    cfg = tiny(modality, mode)
    if modality == "text" and mode == "d2v1":  # the released config: every selected step is <mask>
        cfg = dataclasses.replace(cfg, mask=dataclasses.replace(cfg.mask, bert_corrupt=False))
    if mode == "d2v2":
        cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, clone_batch=2))
    model = Data2Vec(cfg).train()
    batch = batch_for(modality)
    mask = masks_for(model, batch)
    C = cfg.decoder.clone_batch if mode == "d2v2" else 1
    if C > 1:  # every clone of a sample gets clone 0's mask, so one (B, T) mask describes them all
        mask = mask[::C].repeat_interleave(C, 0)
    per_sample = mask[::C]  # (B, T)
    base = _encoder_input(model, batch, mask)

    if modality == "text" and mode == "d2v1":
        changed = dict(batch, input_ids=torch.where(per_sample, 7, batch["input_ids"]))
        assert torch.equal(_encoder_input(model, changed, mask), base)
        return
    moved = _encoder_input(model, batch, mask, lambda x: x + 5.0 * per_sample[..., None])
    assert torch.equal(moved, base), float((moved - base).abs().max())
    # The check has teeth: the same change at kept steps does reach the encoder.
    kept = _encoder_input(model, batch, mask, lambda x: x + 5.0 * (~per_sample)[..., None])
    assert not torch.allclose(kept, base)


@pytest.mark.parametrize("modality,mode", CASES)
def test_teacher_targets_ignore_dropout_at_base_size(modality, mode):
    """With dropout on (audio/text base recipes use 0.1; image's is 0, so it is set here), the
    teacher's targets in train mode must not depend on the RNG."""
    fe = {"vocab_size": 1000} if modality == "text" else {}
    cfg = preset(modality, "base", mode, **fe)
    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, dropout=0.1, attn_dropout=0.1))
    torch.manual_seed(0)
    model = Data2Vec(cfg).train()
    g = torch.Generator().manual_seed(0)
    if modality == "image":
        batch = {"image": torch.randn(2, 3, 224, 224, generator=g)}
    elif modality == "audio":
        batch = {"audio": torch.randn(2, 16000, generator=g), "lengths": torch.tensor([16000, 12000])}
    else:
        batch = {"input_ids": torch.randint(5, 1000, (2, 32), generator=g)}

    def targets(seed):
        torch.manual_seed(seed)
        x, pad = (None, None) if modality == "text" or cfg.ema.ema_local else model.frontend.local(batch)
        return model.targets(batch, x, pad)

    assert torch.equal(targets(0), targets(1))
    assert model.frontend.training  # the student's front end is back in train mode afterwards


def test_image_v2_cls_loss_is_summed_over_clones():
    """fairseq data2vec2: cls term = d2v_loss(cls, mean target) × cls_loss × sample_size, then
    divided by sample_size → cls_loss × Σ over the B·C clones of the per-sample loss."""
    cfg = tiny("image", "d2v2")
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, clone_batch=3, cls_loss=0.01))
    torch.manual_seed(0)
    model = Data2Vec(cfg).eval()
    batch = batch_for("image", B=2)
    mask = masks_for(model, batch)
    cls_outs = []
    hook = model.encoder.register_forward_hook(lambda m, a, out: cls_outs.append(out[0][:, 0].detach()))
    torch.manual_seed(0)
    with_cls = model(batch, mask).loss
    hook.remove()
    no_cls = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, cls_loss=0.0))
    model.cfg = no_cls
    torch.manual_seed(0)
    without = model(batch, mask).loss
    y = model.targets(batch, None, None).repeat_interleave(3, 0).mean(1)  # (B·C, D)
    D = cfg.encoder.dim
    by_hand = 0.01 * ((cls_outs[0] - y) ** 2).sum() / D ** 0.5
    torch.testing.assert_close(with_cls - without, by_hand, rtol=1e-4, atol=1e-6)
    assert cls_outs[0].shape[0] == 6
    per_sample_mean = regression_loss(cls_outs[0], y, 0.0, None)
    assert float(with_cls - without) == pytest.approx(0.01 * 6 * float(per_sample_mean), rel=1e-4)


def test_text_v1_loss_covers_only_mask_tokens():
    """fairseq data2vec_text: `masked_indices = src_tokens.eq(self.mask_idx)`: the 10% random and
    10% kept tokens of BERT corruption are selected but not regressed."""
    # the released (base) config masks every selected token; the demo recipe corrupts like BERT …
    assert preset("text", "base", "d2v1", vocab_size=300).mask.bert_corrupt is False
    cfg = tiny("text", "d2v1")
    assert cfg.mask.bert_corrupt is True
    cfg = dataclasses.replace(cfg, mask=dataclasses.replace(cfg.mask, prob=0.5))
    torch.manual_seed(0)
    model = Data2Vec(cfg).train()
    batch = batch_for("text", B=8)
    mask = masks_for(model, batch)
    is_mask_token = batch["input_ids_masked"] == MASK_ID
    assert int(mask.sum()) > int(is_mask_token.sum()) > 0  # … but with 80/10/10 they differ
    out = model(batch, mask)
    assert out.num_masked == int((mask & is_mask_token).sum())
    assert np.isfinite(float(out.loss))
