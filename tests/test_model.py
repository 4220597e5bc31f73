"""Model numerics against explicit references."""
import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError
from pipeline.model.config import ModelConfig
from pipeline.recipes import preset
from pipeline.model.data2vec import Data2Vec, draw_masks
from pipeline.model.ema import ema_decay_at, ema_update
from pipeline.model.frontends import conv_frames
from pipeline.model.objective import NonFiniteLoss, RepresentationCollapse, regression_loss


def tiny(modality, mode, **kw):
    cfg = preset(modality, "demo", mode, **({"vocab_size": 300} if modality == "text" else {}))
    enc = dataclasses.replace(cfg.encoder, dim=32, depth=3, heads=4)
    dec = dataclasses.replace(cfg.decoder, dim=32, groups=min(cfg.decoder.groups, 8))
    fe = dataclasses.replace(cfg.frontend, conv_channels=32) if modality == "audio" else cfg.frontend
    return dataclasses.replace(cfg, encoder=enc, decoder=dec, frontend=fe,
                               target=dataclasses.replace(cfg.target, top_k=2), **kw)


def batch_for(modality, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    if modality == "image":
        return {"image": torch.randn(B, 3, 28, 28, generator=g)}
    if modality == "audio":
        return {"audio": torch.randn(B, 8000, generator=g), "lengths": torch.full((B,), 8000)}
    ids = torch.randint(5, 300, (B, 24), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    return {"input_ids": ids}


def masks_for(model, batch, seed=0):
    cfg = model.cfg
    B = next(iter(batch.values())).shape[0]
    T = model.num_tokens(batch)
    ids = batch.get("input_ids")
    lengths = None if ids is None else (ids != 1).sum(1).numpy()
    m = draw_masks(cfg, B, T, np.random.default_rng(seed), lengths=lengths,
                   input_ids=None if ids is None else ids.numpy())
    if "input_ids_masked" in m:
        batch["input_ids_masked"] = torch.from_numpy(m["input_ids_masked"])
    return torch.from_numpy(m["mask"])


# ------------------------------------------------------------------ EMA
def test_ema_update_matches_naive_loop():
    torch.manual_seed(0)
    t = [torch.randn(5, 3), torch.randn(7)]
    s = [torch.randn(5, 3), torch.randn(7)]
    expected = [tt.clone() for tt in t]
    for e, ss in zip(expected, s):
        for i in range(e.numel()):
            e.view(-1)[i] = 0.9 * e.view(-1)[i] + 0.1 * ss.view(-1)[i]
    ema_update(t, s, 0.9)
    for a, b in zip(t, expected):
        torch.testing.assert_close(a, b)


def test_ema_decay_schedule():
    assert ema_decay_at(0, 0.999, 0.9999, 1000) == 0.999
    assert ema_decay_at(500, 0.999, 0.9999, 1000) == pytest.approx(0.99945)
    assert ema_decay_at(1000, 0.999, 0.9999, 1000) == 0.9999
    assert ema_decay_at(10**6, 0.999, 0.9999, 1000) == 0.9999
    assert ema_decay_at(5, 0.9998, 0.9998, 0) == 0.9998  # constant (vision 1.0)


def test_model_ema_step_moves_only_ema_parts():
    m = Data2Vec(tiny("audio", "d2v2"))
    with torch.no_grad():
        for p in m.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.teacher_encoder.parameters()]
    decay = m.ema_step(0)
    assert decay == m.cfg.ema.decay
    for b, t, s in zip(before, m.teacher_encoder.parameters(), m.encoder.parameters()):
        torch.testing.assert_close(t, decay * b + (1 - decay) * s)
    # Audio: the teacher is fed the student's CNN features, so it owns no CNN.
    assert not hasattr(m.teacher_frontend, "cnn") and hasattr(m.teacher_frontend, "pos_conv")
    assert all(not p.requires_grad for p in m.teacher_parameters())
    m.train()
    assert not m.teacher_encoder.training and m.encoder.training


# ------------------------------------------------------------------ targets
def test_topk_targets_match_hand_computation():
    cfg = tiny("audio", "d2v1")
    m = Data2Vec(cfg).eval()
    batch = batch_for("audio")
    y = m.targets(batch, None, None)
    # By hand: CNN → norm/proj → teacher uses the student's context (pos conv) → each block's FFN
    # output (before dropout/residual/LN), top-2, instance-norm each over time, average.
    with torch.no_grad():
        x = m.frontend.cnn(batch["audio"][:, None]).transpose(1, 2)
        x = m.frontend.feat_proj(m.frontend.feat_norm(x))
        p = x.transpose(1, 2)
        for layer in m.frontend.pos_conv:
            p = layer(p)
        x = m.frontend.pos_norm(x + p.transpose(1, 2))  # post-LN: the input is normalized once
        ffns = []
        for blk in m.teacher_encoder.blocks:
            a = blk.norm1(x + blk.attn(x, None))
            ffn = blk.fc2(F.gelu(blk.fc1(a)))
            x = blk.norm2(a + ffn)
            ffns.append(ffn)
        top = [F.instance_norm(f.transpose(1, 2)).transpose(1, 2) for f in ffns[-2:]]
        expected = (top[0] + top[1]) / 2
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_block_targets_with_layer_norm_for_vision_v1():
    cfg = tiny("image", "d2v1")
    assert cfg.encoder.layer_output == "block" and cfg.target.final_norm == "layer"
    m = Data2Vec(cfg).eval()
    batch = batch_for("image")
    with torch.no_grad():
        y = m.targets(batch, None, None)
        fe = m.teacher_frontend
        x = fe.proj(batch["image"]).flatten(2).transpose(1, 2) + fe.pos
        x = torch.cat([fe.cls.expand(3, -1, -1), x], 1)
        outs = []
        for blk in m.teacher_encoder.blocks:
            x, _ = blk(x, None)
            outs.append(x[:, 1:])
        avg = sum(F.layer_norm(o, (32,)) for o in outs[-2:]) / 2
        expected = F.layer_norm(avg, (32,))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ loss
def test_regression_loss_by_hand():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    tgt = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    # L2: per-token sums (1+4, 1+9) = (5, 10); × 1/√2; / 2 tokens
    assert regression_loss(pred, tgt, 0.0, None).item() == pytest.approx(15 / 2 / 2 ** 0.5)
    # smooth L1 β=2: |d|<2 → 0.5 d²/2 ; else |d| - 1: (0.25+1, 0.25+2) = 3.5, scale 1, / 2
    assert regression_loss(pred, tgt, 2.0, 1.0).item() == pytest.approx(3.5 / 2)


@pytest.mark.parametrize("modality,mode", [("image", "d2v2"), ("audio", "d2v1"), ("text", "d2v2"),
                                           ("text", "d2v1")])
def test_loss_ignores_unmasked_predictions(modality, mode):
    torch.manual_seed(0)
    m = Data2Vec(tiny(modality, mode)).eval()
    batch = batch_for(modality)
    mask = masks_for(m, batch)
    target_module = m.decoder if mode == "d2v2" else m.encoder
    delta = {}

    def hook(mod, inp, out):
        out0 = out[0] if isinstance(out, tuple) else out
        n = out0.shape[1] - mask.shape[1]  # leading CLS tokens (1.0 encoder output)
        sel = delta["where"]
        bump = torch.zeros_like(out0)
        bump[:, n:][sel] = 100.0
        out0 = out0 + bump
        return (out0, out[1]) if isinstance(out, tuple) else out0

    h = target_module.register_forward_hook(hook)
    losses = {}
    for name, where in [("none", torch.zeros_like(mask)), ("unmasked", ~mask), ("masked", mask)]:
        delta["where"] = where
        torch.manual_seed(1)  # same decoder noise
        losses[name] = m(batch, mask).loss.item()
    h.remove()
    assert losses["unmasked"] == pytest.approx(losses["none"], rel=1e-6)
    assert abs(losses["masked"] - losses["none"]) > 1.0


# ------------------------------------------------------------------ data2vec 2.0 shapes
def test_v2_student_sees_only_unmasked_tokens():
    m = Data2Vec(tiny("image", "d2v2")).eval()
    batch = batch_for("image")
    mask = masks_for(m, batch)
    C, T = m.cfg.decoder.clone_batch, 49
    assert mask.shape == (3 * C, T)
    n_keep = T - int(mask[0].sum())
    seen = {}
    h1 = m.encoder.register_forward_hook(lambda mod, i, o: seen.update(enc_in=i[0].shape) or None)
    h2 = m.decoder.register_forward_hook(lambda mod, i, o: seen.update(dec_out=o.shape) or None)
    m(batch, mask)
    h1.remove(); h2.remove()
    assert seen["enc_in"] == (3 * C, 1 + n_keep, 32)  # CLS + kept tokens only
    assert seen["dec_out"] == (3 * C, T, 32)  # a prediction at every position


def test_conv_frontend_frames():
    assert conv_frames(16000) == 49
    assert conv_frames(16000 + 80) == 50  # 320-sample stride, 400-sample receptive field
    m = Data2Vec(tiny("audio", "d2v2"))
    x, pad = m.frontend.local({"audio": torch.randn(2, 16000)})
    assert x.shape == (2, 49, 32) and pad is None


def test_channels_last_cnn_equals_the_conv1d_layers_it_holds():
    """WaveCNN runs its Conv1d weights as channels-last conv2d: same output and same weight
    gradients as running its modules one after another, channels-first."""
    cnn = Data2Vec(tiny("audio", "d2v2")).frontend.cnn
    x = torch.randn(3, 1, 5000)
    ours = cnn(x)
    ref = x
    for layer in cnn:  # Conv1d → _ChannelNorm (LayerNorm over channels) → GELU, channels-first
        ref = layer(ref)
    assert ours.shape == ref.shape == (3, cnn[0].out_channels, conv_frames(5000))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    g_ours = torch.autograd.grad(ours.square().sum(), [cnn[0].weight, cnn[-2].norm.weight])
    g_ref = torch.autograd.grad(ref.square().sum(), [cnn[0].weight, cnn[-2].norm.weight])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_padding_does_not_leak(modality):
    torch.manual_seed(0)
    m = Data2Vec(tiny(modality, "d2v2")).eval()
    if modality == "audio":
        short = torch.randn(1, 6000)
        long = torch.randn(1, 12000)
        alone = {"audio": short, "lengths": torch.tensor([6000])}
        both = {"audio": torch.cat([F.pad(short, (0, 6000)), long]), "lengths": torch.tensor([6000, 12000])}
    else:
        ids = torch.randint(5, 300, (1, 10))
        long = torch.randint(5, 300, (1, 30))
        alone = {"input_ids": ids}
        both = {"input_ids": torch.cat([F.pad(ids, (0, 20), value=1), long])}
    torch.testing.assert_close(m.extract(alone), m.extract(both)[:1], atol=1e-5, rtol=1e-4)
    t_alone = m.targets(alone, None, None)
    t_both = m.targets(both, None, None)
    torch.testing.assert_close(t_alone[0], t_both[0, : t_alone.shape[1]], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ learning + guards
@pytest.mark.parametrize("modality,mode", [(m, v) for m in ("image", "audio", "text") for v in ("d2v1", "d2v2")])
def test_tiny_model_overfits_a_batch(modality, mode):
    torch.manual_seed(0)
    cfg = tiny(modality, mode)
    cfg = dataclasses.replace(cfg, ema=dataclasses.replace(cfg.ema, decay=1.0, end_decay=1.0))  # fixed targets
    m = Data2Vec(cfg)
    batch = batch_for(modality, B=4)
    mask = masks_for(m, batch)
    opt = torch.optim.AdamW(m.student_parameters(), lr=3e-3)
    first = None
    for step in range(200):
        out = m(batch, mask)
        m.check(out, step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        m.ema_step(step)
        first = first if first is not None else out.loss.item()
    assert out.loss.item() < first / 5, (first, out.loss.item())


def test_collapse_guard_and_nonfinite_loss():
    cfg = tiny("audio", "d2v2")
    cfg = dataclasses.replace(cfg, collapse=dataclasses.replace(cfg.collapse, warmup_steps=10))
    m = Data2Vec(cfg)
    with torch.no_grad():  # a teacher whose FFNs output constants → zero-variance targets
        for blk in m.teacher_encoder.blocks:
            blk.fc2.weight.zero_()
    batch = batch_for("audio")
    mask = masks_for(m, batch)
    out = m(batch, mask)
    assert float(out.target_var) < 0.01
    m.check(out, step=5)  # still in warm-up: no error
    with pytest.raises(RepresentationCollapse, match="target variance"):
        m.check(out, step=10)
    out.loss = torch.tensor(float("nan"))
    with pytest.raises(NonFiniteLoss):
        m.check(out, step=0)


def test_config_validation_names_field():
    with pytest.raises(ConfigError, match="model.encoder.heads"):
        preset("image", "demo", "d2v2").encoder.__class__(dim=100, heads=3)
    with pytest.raises(ConfigError, match="model.target.top_k"):
        dataclasses.replace(preset("audio", "demo", "d2v1"), target=preset("audio", "base").target)
    with pytest.raises(ConfigError, match="model.mode"):
        ModelConfig(modality="image", mode="d2v3")
    cfg = preset("text", "base", "d2v2", vocab_size=1234)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({**cfg.to_dict(), "encoder": {"dimm": 3}})


def test_presets_follow_reference():
    a = preset("audio", "base", "d2v1")
    assert (a.mask.prob, a.mask.length, a.target.top_k, a.encoder.dim) == (0.65, 10, 8, 768)
    i = preset("image", "base", "d2v2")
    assert (i.mask.prob, i.mask.length, i.decoder.clone_batch, i.target.top_k) == (0.8, 3, 16, 10)
    t = preset("text", "large", "d2v2")
    assert (t.encoder.depth, t.encoder.dim, t.mask.prob) == (24, 1024, 0.5)
    assert copy.deepcopy(t) == t
