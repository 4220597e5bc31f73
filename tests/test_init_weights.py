"""Starting a model from a checkpoint: Hugging Face Data2Vec* directories and our final/ reproduce
their hidden states (fp32, max abs diff <= 1e-4); what has no exact counterpart is refused."""
import dataclasses

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.init_weights import NotRepresentable, apply_init, init_model_config, read_init
from pipeline.model.data2vec import Data2Vec
from pipeline.model.frontends import sincos_2d
from tests.test_export_hf import _ours, _perturbed
from tests.test_model import tiny

MODES = {"image": "d2v1", "audio": "d2v2", "text": "d2v1"}


def _hf_config(modality, **kw):
    """Small configs whose widths differ from tiny()'s, so init_model_config must replace them."""
    from transformers import Data2VecAudioConfig, Data2VecTextConfig, Data2VecVisionConfig
    if modality == "image":
        return Data2VecVisionConfig(**{
            "image_size": 28, "patch_size": 4, "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 96, "layer_norm_eps": 1e-5, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0, "use_absolute_position_embeddings": True,
            "use_relative_position_bias": False, "use_shared_relative_position_bias": False,
            "layer_scale_init_value": 0.0, "use_mean_pooling": False, **kw})
    if modality == "audio":
        return Data2VecAudioConfig(**{
            "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96,
            "conv_dim": (16,) * 7, "num_conv_pos_embeddings": 3, "conv_pos_kernel_size": 5,
            "num_conv_pos_embedding_groups": 4, "layer_norm_eps": 1e-5, "hidden_dropout": 0.0,
            "activation_dropout": 0.0, "attention_dropout": 0.0, "feat_proj_dropout": 0.0, "layerdrop": 0.0,
            "mask_time_prob": 0.0, **kw})
    return Data2VecTextConfig(**{
        "vocab_size": 300, "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 96, "max_position_embeddings": 42, "type_vocab_size": 2, "layer_norm_eps": 1e-5,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **kw})


def _hf_model(modality, cls=None, sincos=True, **kw):
    """A randomly initialised Hugging Face model with non-trivial weights everywhere (as after
    training); vision patch positions set to our sin-cos table unless `sincos` is False."""
    import transformers
    cfg = _hf_config(modality, **kw)
    name = cls or {"image": "Data2VecVisionModel", "audio": "Data2VecAudioModel", "text": "Data2VecTextModel"}[modality]
    torch.manual_seed(0)
    hf = getattr(transformers, name)(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if modality == "image" and sincos:
            base = getattr(hf, "data2vec_vision", hf)
            pos = base.embeddings.position_embeddings  # row 0 (CLS) stays random: folded into our cls
            pos[0, 1:] = sincos_2d(cfg.hidden_size, 7, 7)
    return hf


def _inputs(modality):
    g = torch.Generator().manual_seed(1)
    if modality == "audio":
        return {"audio": torch.randn(2, 8000, generator=g)}
    if modality == "text":
        return {"input_ids": torch.randint(5, 300, (2, 20), generator=g)}
    return {"image": torch.randn(2, 3, 28, 28, generator=g)}


def _hf_hidden(hf, modality, inputs):
    base = getattr(hf, {"image": "data2vec_vision", "audio": "data2vec_audio", "text": "data2vec_text"}[modality], hf)
    with torch.no_grad():
        return base(next(iter(inputs.values()))).last_hidden_state


def _start(path, modality):
    init = read_init(path)
    model = Data2Vec(init_model_config(tiny(modality, MODES[modality]), init)).eval()
    apply_init(model, init)
    return init, model


def _assert_teacher_is_student(m):
    for (n, t), s in zip(m.teacher_encoder.named_parameters(), m.encoder.parameters()):
        assert torch.equal(t, s), n
    if m.teacher_frontend is not None:
        student = dict(m.frontend.named_parameters())
        for n, t in m.teacher_frontend.named_parameters():
            assert torch.equal(t, student[n]), n


@pytest.mark.parametrize("modality", ["image", "audio", "text"])
def test_hf_model_matches_hidden_states(tmp_path, modality):
    hf = _hf_model(modality)
    hf.save_pretrained(str(tmp_path / "hf"))
    init, m = _start(str(tmp_path / "hf"), modality)
    assert (init.source, init.mode, init.modality) == ("huggingface", None, modality)
    assert all(k.startswith(("frontend.", "encoder.")) for k in init.state)
    assert (m.cfg.encoder.dim, m.cfg.encoder.depth, m.cfg.mode) == (48, 2, MODES[modality])
    inputs = _inputs(modality)
    ref, got = _hf_hidden(hf, modality, inputs), _ours(m, inputs)
    assert ref.shape == got.shape
    assert (ref - got).abs().max().item() <= 1e-4
    _assert_teacher_is_student(m)
    if modality == "image":  # the teacher owns a front-end copy in the image 1.0 demo recipe
        assert m.teacher_frontend is not None and torch.equal(m.teacher_frontend.cls, m.frontend.cls)
    if modality == "audio":
        assert (m.cfg.frontend.conv_channels, m.cfg.frontend.conv_pos_depth, m.frontend.pos_k) == (16, 3, 5)
    if modality == "text":
        assert m.cfg.frontend.max_positions == 40


@pytest.mark.parametrize("modality,cls", [("audio", "Data2VecAudioForCTC"),
                                          ("text", "Data2VecTextForMaskedLM"),
                                          ("image", "Data2VecVisionForImageClassification")])
def test_task_class_loads_with_head_ignored(tmp_path, modality, cls):
    hf = _hf_model(modality, cls=cls)
    hf.save_pretrained(str(tmp_path / "hf"))
    _, m = _start(str(tmp_path / "hf"), modality)
    inputs = _inputs(modality)
    assert (_hf_hidden(hf, modality, inputs) - _ours(m, inputs)).abs().max().item() <= 1e-4


def test_vision_learned_positions_refused(tmp_path):
    _hf_model("image", sincos=False).save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(NotRepresentable, match="learned absolute positions are not modelled"):
        read_init(str(tmp_path / "hf"))


@pytest.mark.parametrize("field,value", [("layer_scale_init_value", 0.1), ("use_relative_position_bias", True),
                                         ("use_shared_relative_position_bias", True), ("use_mean_pooling", True),
                                         ("use_absolute_position_embeddings", False)])
def test_vision_unmodelled_features_refused(tmp_path, field, value):
    _hf_model("image", sincos=value is not False, **{field: value}).save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(NotRepresentable, match=field):
        read_init(str(tmp_path / "hf"))


def test_vision_layer_scale_weights_refused_even_if_config_says_none(tmp_path):
    """Layer-scale weights in the file are refused even when config.json claims there are none."""
    from safetensors.torch import load_file, save_file
    d = tmp_path / "hf"
    _hf_model("image").save_pretrained(str(d))
    sd = load_file(str(d / "model.safetensors"))
    sd["encoder.layer.0.lambda_1"] = torch.ones(48)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NotRepresentable, match="layer_scale_init_value"):
        read_init(str(d))


@pytest.mark.parametrize("field,value", [("conv_bias", True), ("do_stable_layer_norm", True),
                                         ("feat_extract_norm", "group"), ("conv_dim", (16,) * 6 + (32,)),
                                         ("conv_kernel", (10, 3, 3, 3, 3, 3, 2)), ("hidden_act", "relu"),
                                         ("conv_pos_kernel_size", 2)])
def test_audio_unmodelled_features_refused(tmp_path, field, value):
    _hf_config("audio", **{field: value}).save_pretrained(str(tmp_path / "hf"))
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")  # refused on config.json alone
    with pytest.raises(NotRepresentable, match=field):
        read_init(str(tmp_path / "hf"))


def test_layer_norm_eps_warns(tmp_path):
    _hf_model("text", layer_norm_eps=1e-12).save_pretrained(str(tmp_path / "hf"))
    with pytest.warns(UserWarning, match="layer_norm_eps"):
        read_init(str(tmp_path / "hf"))


@pytest.mark.parametrize("modality", ["image", "audio", "text"])
def test_export_round_trip(tmp_path, modality):
    from pipeline.export_hf import export
    mode = {"image": "d2v1", "audio": "d2v2", "text": "d2v2"}[modality]
    m = _perturbed(tiny(modality, mode))
    export(m, str(tmp_path / "hf"))
    init, m2 = _start(str(tmp_path / "hf"), modality)
    assert init.encoder == {f: getattr(m.cfg.encoder, f) for f in ("dim", "depth", "heads", "mlp_ratio", "pre_norm")}
    inputs = _inputs(modality)
    with torch.no_grad():
        assert (_ours(m, inputs) - _ours(m2, inputs)).abs().max().item() <= 1e-4
    ours = m.state_dict()
    for k, v in init.state.items():
        if modality == "image" and k.endswith("attn.qkv.bias"):  # BEiT drops the key bias (exact)
            D = v.shape[0] // 3
            assert torch.equal(v[:D], ours[k][:D]) and torch.equal(v[2 * D:], ours[k][2 * D:])
            assert not v[D:2 * D].any()
        else:
            torch.testing.assert_close(v, ours[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("modality,mode", [("image", "d2v2"), ("audio", "d2v1"), ("text", "d2v1")])
def test_our_final_dir_gives_identical_tensors(tmp_path, modality, mode):
    from pipeline.train.checkpoint import save_final
    cfg = tiny(modality, mode)
    m = _perturbed(cfg)
    save_final(str(tmp_path / "final"), m, {"model": cfg.to_dict(), "modality": modality})
    init = read_init(str(tmp_path / "final"))
    assert (init.source, init.mode, init.modality) == ("ours", mode, modality)
    student = {k: v for k, v in m.state_dict().items() if k.startswith(("frontend.", "encoder.")) or k == "mask_emb"}
    assert set(init.state) == set(student) and ("mask_emb" in student) == (mode == "d2v1" and modality != "text")
    assert all(torch.equal(init.state[k], student[k]) for k in student)
    # Into a fresh model of another recipe size: the checkpoint's widths win.
    base = dataclasses.replace(tiny(modality, mode), encoder=dataclasses.replace(cfg.encoder, dim=64, depth=4))
    m2 = Data2Vec(init_model_config(base, init))
    apply_init(m2, init)
    assert m2.cfg.encoder == cfg.encoder
    got = m2.state_dict()
    assert all(torch.equal(got[k], student[k]) for k in student)
    _assert_teacher_is_student(m2)


def test_init_model_config_refuses_other_modality_and_bigger_vocab(tmp_path):
    _hf_model("text").save_pretrained(str(tmp_path / "hf"))
    init = read_init(str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match="init: .* text checkpoint but the model is audio"):
        init_model_config(tiny("audio", "d2v2"), init)
    big = tiny("text", "d2v2")
    big = dataclasses.replace(big, frontend=dataclasses.replace(big.frontend, vocab_size=500))
    with pytest.raises(ConfigError, match="init: .*500 ids"):
        init_model_config(big, init)


def test_apply_init_refuses_a_model_of_other_shape(tmp_path):
    _hf_model("text").save_pretrained(str(tmp_path / "hf"))
    init = read_init(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="does not fit this model.*missing .*encoder.blocks.2"):
        apply_init(Data2Vec(tiny("text", "d2v2")), init)  # 3 blocks of 32, not 2 of 48
