"""Export a pretrained encoder as a Hugging Face `transformers` model directory. No Ray.

    audio (post-LN, conv positions)  → Data2VecAudioModel
    text  (post-LN, learned positions) → Data2VecTextModel (+ the tokenizer)
    image (pre-LN, data2vec 1.0 recipe) → Data2VecVisionModel (BEiT layout)

Where our architecture has no exact counterpart, `NotRepresentable` explains why (e.g. a
post-LN image encoder — data2vec 2.0's — cannot be expressed in BEiT's pre-LN layout).
"""
from __future__ import annotations

import os
import shutil

import torch

from pipeline.model.data2vec import Data2Vec
from pipeline.model.frontends import CONV_LAYERS


class NotRepresentable(ValueError):
    """The checkpoint's architecture cannot be expressed exactly by the Hugging Face class."""


def _qkv(attn, D):
    w, b = attn.qkv.weight.detach(), attn.qkv.bias.detach()
    return (w[:D], b[:D]), (w[D:2 * D], b[D:2 * D]), (w[2 * D:], b[2 * D:])


def _lin(sd, name, weight, bias=None):
    sd[f"{name}.weight"] = weight.detach().clone()
    if bias is not None:
        sd[f"{name}.bias"] = bias.detach().clone()


def _ln(sd, name, ln):
    _lin(sd, name, ln.weight, ln.bias)


def _audio_parts(model):
    """(Hugging Face config, state dict of the Data2VecAudioModel) for our audio encoder."""
    from transformers import Data2VecAudioConfig

    cfg, fe, enc = model.cfg, model.frontend, model.encoder
    if enc.cfg.pre_norm:
        raise NotRepresentable("Data2VecAudio is post-LN; this encoder is pre-LN")
    D, C = cfg.encoder.dim, cfg.frontend.conv_channels
    hf_cfg = Data2VecAudioConfig(
        hidden_size=D, num_hidden_layers=cfg.encoder.depth, num_attention_heads=cfg.encoder.heads,
        intermediate_size=int(D * cfg.encoder.mlp_ratio), hidden_act="gelu", layer_norm_eps=1e-5,
        hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
        layerdrop=0.0, conv_dim=(C,) * len(CONV_LAYERS), conv_kernel=tuple(k for k, _ in CONV_LAYERS),
        conv_stride=tuple(s for _, s in CONV_LAYERS), conv_bias=False, feat_extract_activation="gelu",
        num_conv_pos_embeddings=len(fe.pos_conv), conv_pos_kernel_size=fe.pos_k,
        num_conv_pos_embedding_groups=cfg.frontend.conv_pos_groups, mask_time_prob=0.0)
    sd = {}
    for i in range(len(CONV_LAYERS)):
        sd[f"feature_extractor.conv_layers.{i}.conv.weight"] = fe.cnn[3 * i].weight.detach().clone()
        _ln(sd, f"feature_extractor.conv_layers.{i}.layer_norm", fe.cnn[3 * i + 1].norm)
    _ln(sd, "feature_projection.layer_norm", fe.feat_norm)
    _lin(sd, "feature_projection.projection", fe.feat_proj.weight, fe.feat_proj.bias)
    for i, layer in enumerate(fe.pos_conv):
        _lin(sd, f"encoder.pos_conv_embed.layers.{i}.conv", layer[0].weight, layer[0].bias)
    _ln(sd, "encoder.layer_norm", fe.pos_norm)
    for i, blk in enumerate(enc.blocks):
        p = f"encoder.layers.{i}"
        (qw, qb), (kw, kb), (vw, vb) = _qkv(blk.attn, D)
        _lin(sd, f"{p}.attention.q_proj", qw, qb)
        _lin(sd, f"{p}.attention.k_proj", kw, kb)
        _lin(sd, f"{p}.attention.v_proj", vw, vb)
        _lin(sd, f"{p}.attention.out_proj", blk.attn.proj.weight, blk.attn.proj.bias)
        _ln(sd, f"{p}.layer_norm", blk.norm1)
        _lin(sd, f"{p}.feed_forward.intermediate_dense", blk.fc1.weight, blk.fc1.bias)
        _lin(sd, f"{p}.feed_forward.output_dense", blk.fc2.weight, blk.fc2.bias)
        _ln(sd, f"{p}.final_layer_norm", blk.norm2)
    if getattr(model, "mask_emb", None) is not None:  # the student's (1.0 / fine-tuning) mask embedding
        # Hugging Face only creates masked_spec_embed with SpecAugment on: its default time masks
        # (p 0.05) then apply when training there; inference is unaffected.
        hf_cfg.mask_time_prob = 0.05
        sd["masked_spec_embed"] = model.mask_emb.detach().clone()
    return hf_cfg, sd


def audio_to_hf(model: Data2Vec):
    from transformers import Data2VecAudioModel

    hf_cfg, sd = _audio_parts(model)
    hf = Data2VecAudioModel(hf_cfg)
    _load(hf, sd, allow_missing={"masked_spec_embed"})
    return hf


def _text_parts(model):
    """(Hugging Face config, state dict of the Data2VecTextModel) for our text encoder."""
    from transformers import Data2VecTextConfig

    cfg, fe, enc = model.cfg, model.frontend, model.encoder
    if enc.cfg.pre_norm:
        raise NotRepresentable("Data2VecText (RoBERTa) is post-LN; this encoder is pre-LN")
    D, P = cfg.encoder.dim, cfg.frontend.max_positions
    hf_cfg = Data2VecTextConfig(
        vocab_size=cfg.frontend.vocab_size, hidden_size=D, num_hidden_layers=cfg.encoder.depth,
        num_attention_heads=cfg.encoder.heads, intermediate_size=int(D * cfg.encoder.mlp_ratio),
        hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        max_position_embeddings=P + 2, type_vocab_size=1, layer_norm_eps=1e-5,
        pad_token_id=1, bos_token_id=0, eos_token_id=2)
    sd = {"embeddings.word_embeddings.weight": fe.tokens.weight.detach().clone()}
    # RoBERTa numbers positions from padding_idx + 1 = 2: our position i is its row i + 2.
    pos = torch.zeros(P + 2, D)
    pos[2:] = fe.positions.weight.detach()
    sd["embeddings.position_embeddings.weight"] = pos
    sd["embeddings.token_type_embeddings.weight"] = torch.zeros(1, D)
    _ln(sd, "embeddings.LayerNorm", fe.norm)
    for i, blk in enumerate(enc.blocks):
        p = f"encoder.layer.{i}"
        (qw, qb), (kw, kb), (vw, vb) = _qkv(blk.attn, D)
        _lin(sd, f"{p}.attention.self.query", qw, qb)
        _lin(sd, f"{p}.attention.self.key", kw, kb)
        _lin(sd, f"{p}.attention.self.value", vw, vb)
        _lin(sd, f"{p}.attention.output.dense", blk.attn.proj.weight, blk.attn.proj.bias)
        _ln(sd, f"{p}.attention.output.LayerNorm", blk.norm1)
        _lin(sd, f"{p}.intermediate.dense", blk.fc1.weight, blk.fc1.bias)
        _lin(sd, f"{p}.output.dense", blk.fc2.weight, blk.fc2.bias)
        _ln(sd, f"{p}.output.LayerNorm", blk.norm2)
    return hf_cfg, sd


def text_to_hf(model: Data2Vec):
    from transformers import Data2VecTextModel

    hf_cfg, sd = _text_parts(model)
    hf = Data2VecTextModel(hf_cfg, add_pooling_layer=False)
    _load(hf, sd)
    return hf


def _image_parts(model):
    """(Hugging Face config, state dict of the Data2VecVisionModel) for our pre-LN image encoder."""
    from transformers import Data2VecVisionConfig

    cfg, fe, enc = model.cfg, model.frontend, model.encoder
    if not enc.cfg.pre_norm:
        raise NotRepresentable(
            "this image encoder is post-LN (the data2vec 2.0 recipe); Hugging Face's Data2VecVision uses "
            "BEiT's pre-LN blocks, so the weights cannot be mapped exactly. Pretrain with "
            "--set model.mode=d2v1 (pre-LN, as the data2vec 1.0 vision paper) to export, or use RUN_DIR/final.")
    if not fe.num_extra:
        raise NotRepresentable("Data2VecVision always has a CLS token; this encoder has none")
    D, N = cfg.encoder.dim, fe.pos.shape[1]
    hf_cfg = Data2VecVisionConfig(
        image_size=cfg.frontend.image_size, patch_size=cfg.frontend.patch_size, num_channels=3,
        hidden_size=D, num_hidden_layers=cfg.encoder.depth, num_attention_heads=cfg.encoder.heads,
        intermediate_size=int(D * cfg.encoder.mlp_ratio), hidden_act="gelu", layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
        use_mask_token=False, use_absolute_position_embeddings=True, use_relative_position_bias=False,
        use_shared_relative_position_bias=False, layer_scale_init_value=0.0, use_mean_pooling=False)
    sd = {"embeddings.cls_token": fe.cls.detach().clone()}
    _lin(sd, "embeddings.patch_embeddings.projection", fe.proj.weight, fe.proj.bias)
    # Our CLS carries no position; patches get the fixed sin-cos table.
    sd["embeddings.position_embeddings"] = torch.cat([torch.zeros(1, 1, D), fe.pos.detach().reshape(1, N, D)], 1)
    for i, blk in enumerate(enc.blocks):
        p = f"encoder.layer.{i}"
        (qw, qb), (kw, _kb), (vw, vb) = _qkv(blk.attn, D)
        _ln(sd, f"{p}.layernorm_before", blk.norm1)
        _lin(sd, f"{p}.attention.attention.query", qw, qb)
        # BEiT's key has no bias. Dropping ours is exact: q·(k+b) shifts every score of a query
        # by the same q·b, and softmax is invariant to that.
        _lin(sd, f"{p}.attention.attention.key", kw)
        _lin(sd, f"{p}.attention.attention.value", vw, vb)
        _lin(sd, f"{p}.attention.output.dense", blk.attn.proj.weight, blk.attn.proj.bias)
        _ln(sd, f"{p}.layernorm_after", blk.norm2)
        _lin(sd, f"{p}.intermediate.dense", blk.fc1.weight, blk.fc1.bias)
        _lin(sd, f"{p}.output.dense", blk.fc2.weight, blk.fc2.bias)
    if enc.norm is not None:  # a fine-tuned image model's head owns the final norm (pooler.layernorm)
        _ln(sd, "layernorm", enc.norm)
    return hf_cfg, sd


def image_to_hf(model: Data2Vec):
    from transformers import Data2VecVisionModel

    hf_cfg, sd = _image_parts(model)
    hf = Data2VecVisionModel(hf_cfg, add_pooling_layer=False)
    _load(hf, sd)
    return hf


def _load(hf, sd: dict, allow_missing: set[str] = frozenset()) -> None:
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in allow_missing and not k.endswith("position_ids")]
    if missing or unexpected:
        raise NotRepresentable(f"weight mapping incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.eval()


def _after_bn(model, linear: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the first head Linear with the model's eval-mode feature_bn folded in:
    W·(x − μ)/σ + b = (W/σ)·x + (b − (W/σ)·μ)."""
    w, b = linear.weight, linear.bias
    if hasattr(model, "feature_bn"):
        bn = model.feature_bn
        w = w * (bn.running_var + bn.eps).rsqrt()
        b = b - w @ bn.running_mean
    return w, b


def finetuned_to_hf(model, labels: list[str]):
    """A FineTuneModel (pipeline/model/finetune.py) → the Hugging Face task class with equal logits:
    image → Data2VecVisionForImageClassification (mean-pooled patches + LayerNorm), audio classify →
    Data2VecAudioForSequenceClassification (identity projector, then our head), audio ctc →
    Data2VecAudioForCTC (blank = pad id 0), text → Data2VecTextForSequenceClassification."""
    import transformers as tf

    m, task = model.cfg.modality, model.task
    parts = {"image": _image_parts, "audio": _audio_parts, "text": _text_parts}[m]
    hf_cfg, base = parts(model)
    prefix = {"image": "data2vec_vision", "audio": "data2vec_audio", "text": "data2vec_text"}[m]
    sd = {f"{prefix}.{k}": v for k, v in base.items()}
    allow = {f"{prefix}.masked_spec_embed"}
    if task == "ctc":
        hf_cfg.vocab_size, hf_cfg.pad_token_id, hf_cfg.ctc_loss_reduction = len(labels), 0, "mean"
        _lin(sd, "lm_head", model.head.weight, model.head.bias)
        cls = tf.Data2VecAudioForCTC
    else:
        hf_cfg.num_labels = len(labels)
        hf_cfg.id2label = dict(enumerate(labels))
        hf_cfg.label2id = {v: i for i, v in enumerate(labels)}
        if m == "image":
            if not model.frontend.num_extra:
                raise NotRepresentable("Data2VecVisionForImageClassification always has a CLS token; this encoder has none")
            # use_mean_pooling: no final LayerNorm on the tokens, the pooler's LayerNorm on their
            # mean (= our fc_norm, which is the fine-tuning model's only final norm).
            hf_cfg.use_mean_pooling = True
            _ln(sd, f"{prefix}.pooler.layernorm", model.fc_norm)
            _lin(sd, "classifier", *_after_bn(model, model.head))
            cls = tf.Data2VecVisionForImageClassification
        elif m == "audio":
            D = model.cfg.encoder.dim
            hf_cfg.classifier_proj_size, hf_cfg.use_weighted_layer_sum = D, False
            _lin(sd, "projector", torch.eye(D), torch.zeros(D))  # mean(h)·I = mean(h): our head follows
            _lin(sd, "classifier", *_after_bn(model, model.head))
            cls = tf.Data2VecAudioForSequenceClassification
        else:
            _lin(sd, "classifier.dense", *_after_bn(model, model.head["dense"]))
            _lin(sd, "classifier.out_proj", model.head["out_proj"].weight, model.head["out_proj"].bias)
            cls = tf.Data2VecTextForSequenceClassification
    hf = cls(hf_cfg)
    _load(hf, sd, allow_missing=allow)
    return hf


def save_ctc_processor(out: str, vocab: list[str]) -> None:
    """vocab.json + Wav2Vec2CTCTokenizer + feature extractor (16 kHz, per-clip normalization)."""
    import json

    from transformers import Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2Processor

    path = os.path.join(out, "vocab.json")
    with open(path, "w") as f:
        json.dump({ch: i for i, ch in enumerate(vocab)}, f, ensure_ascii=False)
    tok = Wav2Vec2CTCTokenizer(path, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                               word_delimiter_token="|")
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True,
                                  return_attention_mask=True)
    Wav2Vec2Processor(feature_extractor=fe, tokenizer=tok).save_pretrained(out)


def export(model: Data2Vec, out: str, tokenizer_json: str | None = None):
    """Write a `from_pretrained`-loadable directory (and the tokenizer for text)."""
    make = {"image": image_to_hf, "audio": audio_to_hf, "text": text_to_hf}[model.cfg.modality]
    hf = make(model)
    os.makedirs(out, exist_ok=True)
    hf.save_pretrained(out)
    if model.cfg.modality == "text" and tokenizer_json:
        _save_tokenizer(out, tokenizer_json)
    return hf


def _save_tokenizer(out: str, tokenizer_json: str) -> None:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_json, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    tok.save_pretrained(out)
    shutil.copy(tokenizer_json, os.path.join(out, "tokenizer.json"))


def export_finetuned(model, labels: list[str], out: str, tokenizer_json: str | None = None):
    """Write a fine-tuned model as its Hugging Face task class (+ tokenizer or CTC processor)."""
    hf = finetuned_to_hf(model, labels)
    os.makedirs(out, exist_ok=True)
    hf.save_pretrained(out)
    if model.task == "ctc":
        save_ctc_processor(out, labels)
    elif model.cfg.modality == "text" and tokenizer_json:
        _save_tokenizer(out, tokenizer_json)
    return hf
