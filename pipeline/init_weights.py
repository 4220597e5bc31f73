"""Start a model from a checkpoint: our RUN_DIR/final or a Hugging Face Data2Vec* directory. No Ray.

    init = read_init(path)                      # → InitCheckpoint in our naming, or NotRepresentable
    cfg = init_model_config(recipe_cfg, init)   # the checkpoint's widths and front end, the recipe's rest
    model = Data2Vec(cfg); apply_init(model, init)  # student ← checkpoint; teacher ← copy of the student

`path` is either RUN_DIR/final (config.json with a "model" key + model.safetensors; the student's
`frontend.*` / `encoder.*` weights are used) or a Hugging Face directory (config.json with
model_type data2vec-vision / -audio / -text + model.safetensors or pytorch_model.bin, sharded or
not) holding Data2Vec{Vision,Audio,Text}Model or one of its task classes (…ForCTC,
…ForSequenceClassification, …ForImageClassification, …ForMaskedLM, …): the `data2vec_*.` prefix
is stripped and head weights are ignored.

Hugging Face → ours inverts pipeline/export_hf.py exactly:
  * q/k/v projections are concatenated into our fused qkv; BEiT's key has no bias, so ours is
    zero (exact: a key bias shifts all scores of a query equally, softmax ignores that).
  * text: RoBERTa numbers positions from padding_idx + 1 = 2, so our position i is its row i + 2;
    HF adds token_type_embeddings[0] to every token (we have no token types; HF's default
    token_type_ids are all 0), so that row is folded into our positions. Rows > 0 of a
    type_vocab_size > 1 table are only reached with explicit token_type_ids and are ignored.
    Positions of padded steps differ (HF gives them the padding position) — those steps are
    padding on both sides.
  * image: HF adds position row 0 to the CLS token; our CLS carries no position, so that row is
    folded into our `cls`. Our patch positions are the FIXED 2-D sin-cos table (a buffer, not a
    parameter): HF patch positions must equal it (max abs diff ≤ 1e-5, or the storage dtype's
    resolution), otherwise the checkpoint is refused — learned absolute positions are not modelled.
  * audio: HF's `num_conv_pos_embeddings` conv layers of kernel `conv_pos_kernel_size` become our
    conv_pos_depth = that count and conv_pos_width = kernel × count (our kernel is
    max(3, width // depth), which must give back the kernel).

What cannot be expressed exactly is refused with `NotRepresentable` naming the config.json field
(see `_vision`, `_audio`, `_text`). A `layer_norm_eps` other than our 1e-5 only warns: LayerNorm
outputs then differ by about (1e-5 − eps) / (2 · variance) relatively, negligible unless an input
row is nearly constant.

Only the weights come from the checkpoint: dropout, masking, targets, EMA, the 1.0 head / 2.0
decoder and the optimisation all come from the recipe (e.g. an audio recipe's encoder dropout 0.1,
not HF's hidden_dropout). The front-end settings the weights do not fix come from the data, too:
image_size (our sin-cos table is built for the data's grid), the text <mask> id.
"""
from __future__ import annotations

import dataclasses
import io
import json
import warnings
from dataclasses import dataclass

import torch

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.export_hf import NotRepresentable
from pipeline.model.config import ModelConfig
from pipeline.model.frontends import CONV_LAYERS, sincos_2d

__all__ = ["InitCheckpoint", "NotRepresentable", "apply_init", "init_model_config", "read_init"]

ENCODER_FIELDS = ("dim", "depth", "heads", "mlp_ratio", "pre_norm")
FRONTEND_FIELDS = {
    "image": ("patch_size", "cls_token"),
    "audio": ("conv_channels", "conv_pos_width", "conv_pos_depth", "conv_pos_groups"),
    "text": ("vocab_size", "max_positions"),
}
HF_TYPES = {"data2vec-vision": "image", "data2vec-audio": "audio", "data2vec-text": "text"}
OUR_LN_EPS = 1e-5
STUDENT = ("frontend.", "encoder.")
MASK_EMB = "mask_emb"


@dataclass
class InitCheckpoint:
    modality: str
    """image | audio | text"""
    source: str
    """"ours" (RUN_DIR/final) or "huggingface"."""
    path: str
    encoder: dict
    """EncoderConfig fields the checkpoint fixes (dim, depth, heads, mlp_ratio, pre_norm)."""
    frontend: dict
    """FrontEndConfig fields its weights fix (image: patch_size, cls_token; audio: conv_channels,
    conv_pos_width, conv_pos_depth, conv_pos_groups; text: vocab_size, max_positions)."""
    state: dict
    """Student weights in our Data2Vec naming: "frontend.…", "encoder.…" and, where the checkpoint
    has one, the mask embedding "mask_emb" (data2vec 1.0 audio/image; Hugging Face's
    masked_spec_embed)."""
    mode: str | None
    """Ours: the run's model.mode; Hugging Face: None."""


# ----------------------------------------------------------------------------- reading
def read_init(path: str) -> InitCheckpoint:
    """RUN_DIR/final or a Hugging Face Data2Vec* directory (local path or URI) → InitCheckpoint.
    Raises NotRepresentable (a ValueError) with the reason and the config field when the
    checkpoint's architecture has no exact counterpart here, ValueError when it is unreadable."""
    fs, root = storage.resolve(path)
    if not storage.exists(fs, f"{root}/config.json"):
        raise ValueError(f"init: {path!r} has no config.json (expected RUN_DIR/final or a Hugging Face "
                         "model directory)")
    config = json.loads(storage.read_text(fs, f"{root}/config.json"))
    if isinstance(config.get("model"), dict) and "modality" in config["model"]:
        return _read_ours(path, config, _weights(fs, root, path))
    model_type = config.get("model_type")
    if model_type not in HF_TYPES:
        raise NotRepresentable(f"init: {path!r}: config.json model_type is {model_type!r}; expected one of "
                               f"{', '.join(HF_TYPES)} (or our RUN_DIR/final)")
    reader = {"image": _vision, "audio": _audio, "text": _text}[HF_TYPES[model_type]]
    return reader(_HF(path, config, lambda: _weights(fs, root, path)))


def _read_bytes(fs, p: str) -> bytes:
    with fs.open_input_stream(p) as f:
        return f.read()


def _weights(fs, root: str, path: str) -> dict:
    """model.safetensors / pytorch_model.bin (or their sharded *.index.json) → {name: tensor}."""
    from safetensors.torch import load

    def one(name):
        data = _read_bytes(fs, f"{root}/{name}")
        if name.endswith(".safetensors"):
            return load(data)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    for name in ("model.safetensors", "pytorch_model.bin"):
        if storage.exists(fs, f"{root}/{name}"):
            return one(name)
        if storage.exists(fs, f"{root}/{name}.index.json"):
            index = json.loads(storage.read_text(fs, f"{root}/{name}.index.json"))
            out = {}
            for shard in sorted(set(index["weight_map"].values())):
                out.update(one(shard))
            return out
    raise ValueError(f"init: {path!r} has no model.safetensors or pytorch_model.bin (for a pretraining run, "
                     "pass RUN_DIR/final)")


def _read_ours(path: str, config: dict, tensors: dict) -> InitCheckpoint:
    cfg = ModelConfig.from_dict(config["model"])
    state = {k: v for k, v in tensors.items() if k.startswith(STUDENT) or k == MASK_EMB}
    if not any(k.startswith(STUDENT) for k in state):
        raise ValueError(f"init: {path!r}: model.safetensors holds no frontend.* / encoder.* weights")
    return InitCheckpoint(
        modality=cfg.modality, source="ours", path=path,
        encoder={f: getattr(cfg.encoder, f) for f in ENCODER_FIELDS},
        frontend={f: getattr(cfg.frontend, f) for f in FRONTEND_FIELDS[cfg.modality]},
        state=state, mode=cfg.mode)


class _HF:
    """One Hugging Face checkpoint being mapped: config lookups that refuse with the field's name,
    and weights taken one by one so that unmapped leftovers can be reported."""

    def __init__(self, path: str, config: dict, load):
        self.path, self.config, self._load = path, config, load
        self._sd: dict | None = None
        self.dtypes: dict = {}
        self.used: set[str] = set()

    @property
    def sd(self) -> dict:
        """The base model's weights, read on first use (config.json alone refuses most checkpoints)."""
        if self._sd is None:
            tensors = self._load()
            prefix = self.config["model_type"].replace("-", "_") + "."
            if any(k.startswith(prefix) for k in tensors):  # a task class: keep the base model, drop heads
                tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            # Read in fp32, so sums such as the folded positions stay exact.
            self.dtypes = {k: v.dtype for k, v in tensors.items()}
            self._sd = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
        return self._sd

    def get(self, field: str, default):
        return self.config.get(field, default)

    def refuse_unless(self, ok: bool, field: str, why: str) -> None:
        if not ok:
            value = self.config.get(field, "<default>")
            raise NotRepresentable(f"init: {self.path!r}: config.json {field}={value!r}: {why}")

    def t(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise NotRepresentable(f"init: {self.path!r}: weight {key!r} is missing from the checkpoint")
        self.used.add(key)
        return self.sd[key]

    def lin(self, out: dict, ours: str, theirs: str, bias: bool = True) -> None:
        out[f"{ours}.weight"] = self.t(f"{theirs}.weight")
        if bias:
            out[f"{ours}.bias"] = self.t(f"{theirs}.bias")

    def qkv(self, out: dict, ours: str, q: str, k: str, v: str, k_bias: bool = True) -> None:
        out[f"{ours}.weight"] = torch.cat([self.t(f"{n}.weight") for n in (q, k, v)], 0)
        kb = self.t(f"{k}.bias") if k_bias else torch.zeros_like(self.t(f"{q}.bias"))
        out[f"{ours}.bias"] = torch.cat([self.t(f"{q}.bias"), kb, self.t(f"{v}.bias")], 0)

    def common(self) -> tuple[int, int, int, float]:
        """Checks shared by the three classes → (dim, depth, heads, mlp_ratio)."""
        D, depth = self.get("hidden_size", 768), self.get("num_hidden_layers", 12)
        heads, inner = self.get("num_attention_heads", 12), self.get("intermediate_size", 3072)
        self.refuse_unless(self.get("hidden_act", "gelu") == "gelu", "hidden_act",
                           "our blocks use the exact (erf) GELU only")
        ratio = inner / D
        self.refuse_unless(int(D * ratio) == inner, "intermediate_size",
                           f"our FFN width is int(dim × mlp_ratio), which cannot give {inner} for dim {D}")
        eps = self.get("layer_norm_eps", OUR_LN_EPS)
        if eps != OUR_LN_EPS:
            warnings.warn(f"init: {self.path!r}: config.json layer_norm_eps={eps} but our LayerNorms use "
                          f"{OUR_LN_EPS}; outputs differ by about ({OUR_LN_EPS} - eps) / (2 · variance) "
                          "relatively (negligible unless a LayerNorm input is nearly constant)", stacklevel=3)
        return D, depth, heads, ratio

    def finish(self, modality: str, encoder: dict, frontend: dict, state: dict,
               ignorable: tuple[str, ...]) -> InitCheckpoint:
        """Refuse if base-model weights are left that the mapping did not use (a feature the
        config did not announce, e.g. layer scale written by another converter)."""
        left = sorted(k for k in self.sd if k not in self.used and not any(p in k for p in ignorable))
        if left:
            raise NotRepresentable(f"init: {self.path!r}: weights with no counterpart in our model: "
                                   f"{left[:6]}{' …' if len(left) > 6 else ''}")
        return InitCheckpoint(modality=modality, source="huggingface", path=self.path, encoder=encoder,
                              frontend=frontend, state=state, mode=None)


def _encoder_dict(D, depth, heads, ratio, pre_norm):
    return dict(dim=D, depth=depth, heads=heads, mlp_ratio=ratio, pre_norm=pre_norm)


def _square(hf: _HF, field: str, default: int) -> int:
    v = hf.get(field, default)
    if isinstance(v, (list, tuple)):
        hf.refuse_unless(len(v) == 2 and v[0] == v[1], field, "our image front end is square")
        v = v[0]
    return int(v)


# ----------------------------------------------------------------------------- image
def _vision(hf: _HF) -> InitCheckpoint:
    """Data2VecVision (BEiT layout, pre-LN) → our pre-LN image encoder with CLS."""
    D, depth, heads, ratio = hf.common()
    hf.refuse_unless(not hf.get("use_relative_position_bias", False), "use_relative_position_bias",
                     "relative position biases are not modelled (our image positions are fixed 2-D sin-cos)")
    hf.refuse_unless(not hf.get("use_shared_relative_position_bias", False), "use_shared_relative_position_bias",
                     "relative position biases are not modelled (our image positions are fixed 2-D sin-cos)")
    layer_scale = ("layer_scale_init_value", "per-channel layer scale (the lambda_1 / lambda_2 weights, which "
                   "published data2vec-vision checkpoints carry) is not modelled by our encoder blocks")
    hf.refuse_unless(hf.get("layer_scale_init_value", 0.1) <= 0, *layer_scale)
    hf.refuse_unless(hf.get("use_absolute_position_embeddings", False), "use_absolute_position_embeddings",
                     "without absolute positions the patches carry none, but ours always add the fixed "
                     "2-D sin-cos table")
    no_final_norm = ("use_mean_pooling", "with mean pooling Hugging Face applies its final LayerNorm after "
                     "pooling only (last_hidden_state is not normalized), but our pre-LN encoder normalizes "
                     "every token")
    hf.refuse_unless(not hf.get("use_mean_pooling", True), *no_final_norm)
    hf.refuse_unless(hf.get("num_channels", 3) == 3, "num_channels", "our patch embedding takes RGB (3 channels)")
    image, patch = _square(hf, "image_size", 224), _square(hf, "patch_size", 16)
    hf.refuse_unless(image % patch == 0, "patch_size", f"must divide image_size {image}")
    g = image // patch
    # The weights must agree with config.json (other converters may write them regardless).
    hf.refuse_unless(not any(k.endswith((".lambda_1", ".lambda_2")) for k in hf.sd), layer_scale[0],
                     "the weights hold lambda_1 / lambda_2 all the same: " + layer_scale[1])
    hf.refuse_unless("layernorm.weight" in hf.sd, no_final_norm[0],
                     "the weights have no final `layernorm` all the same: " + no_final_norm[1])

    sd = {}
    pos = hf.t("embeddings.position_embeddings")  # (1, 1 + g·g, D): row 0 belongs to CLS
    if pos.shape != (1, 1 + g * g, D):
        raise NotRepresentable(f"init: {hf.path!r}: position_embeddings {tuple(pos.shape)} != (1, {1 + g * g}, {D})")
    table = sincos_2d(D, g, g)
    dtype = hf.dtypes["embeddings.position_embeddings"]
    tol = max(1e-5, torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-5
    diff = (pos[0, 1:] - table).abs().max().item() if table.shape == pos[0, 1:].shape else float("inf")
    if not diff <= tol:
        raise NotRepresentable(
            f"init: {hf.path!r}: its patch position embeddings are not our fixed 2-D sin-cos table (max abs "
            f"difference {diff:.3g} > {tol:g}): learned absolute positions are not modelled — our image "
            "front end always adds the fixed sin-cos table, so these weights cannot be mapped exactly "
            "(config.json use_absolute_position_embeddings)")
    # Our CLS carries no position: HF's row-0 position is folded into it.
    sd["frontend.cls"] = hf.t("embeddings.cls_token") + pos[:, :1]
    hf.lin(sd, "frontend.proj", "embeddings.patch_embeddings.projection")
    for i in range(depth):
        p, o = f"encoder.layer.{i}", f"encoder.blocks.{i}"
        hf.lin(sd, f"{o}.norm1", f"{p}.layernorm_before")
        hf.qkv(sd, f"{o}.attn.qkv", f"{p}.attention.attention.query", f"{p}.attention.attention.key",
               f"{p}.attention.attention.value", k_bias=False)
        hf.lin(sd, f"{o}.attn.proj", f"{p}.attention.output.dense")
        hf.lin(sd, f"{o}.norm2", f"{p}.layernorm_after")
        hf.lin(sd, f"{o}.fc1", f"{p}.intermediate.dense")
        hf.lin(sd, f"{o}.fc2", f"{p}.output.dense")
    hf.lin(sd, "encoder.norm", "layernorm")
    return hf.finish("image", _encoder_dict(D, depth, heads, ratio, True),
                     {"patch_size": patch, "cls_token": True}, sd,
                     ignorable=("pooler.", "embeddings.mask_token", "relative_position_index", "position_ids"))


# ----------------------------------------------------------------------------- audio
def _audio(hf: _HF) -> InitCheckpoint:
    """Data2VecAudio (wav2vec2 layer-norm CNN, conv positions, post-LN) → our audio encoder."""
    D, depth, heads, ratio = hf.common()
    hf.refuse_unless(hf.get("feat_extract_norm", "layer") == "layer", "feat_extract_norm",
                     "our CNN LayerNorms every conv layer (wav2vec2's 'layer' extractor)")
    hf.refuse_unless(not hf.get("conv_bias", False), "conv_bias", "our CNN convolutions have no bias")
    hf.refuse_unless(not hf.get("do_stable_layer_norm", False), "do_stable_layer_norm",
                     "our audio encoder is post-LN")
    hf.refuse_unless(hf.get("feat_extract_activation", "gelu") == "gelu", "feat_extract_activation",
                     "our CNN and conv positions use GELU")
    hf.refuse_unless(not hf.get("add_adapter", False), "add_adapter",
                     "the adapter after the encoder is not modelled")
    dims = list(hf.get("conv_dim", [512] * 7))
    kernels = list(hf.get("conv_kernel", [10, 3, 3, 3, 3, 2, 2]))
    strides = list(hf.get("conv_stride", [5, 2, 2, 2, 2, 2, 2]))
    hf.refuse_unless(len(dims) == len(CONV_LAYERS) and len(set(dims)) == 1, "conv_dim",
                     f"our CNN has {len(CONV_LAYERS)} layers of one width (conv_channels)")
    hf.refuse_unless(kernels == [k for k, _ in CONV_LAYERS], "conv_kernel",
                     f"our CNN's kernels are {[k for k, _ in CONV_LAYERS]}")
    hf.refuse_unless(strides == [s for _, s in CONV_LAYERS], "conv_stride",
                     f"our CNN's strides are {[s for _, s in CONV_LAYERS]}")
    n_pos, k = hf.get("num_conv_pos_embeddings", 5), hf.get("conv_pos_kernel_size", 19)
    groups = hf.get("num_conv_pos_embedding_groups", 16)
    width = k * n_pos
    hf.refuse_unless(n_pos >= 1 and max(3, width // n_pos) == k, "conv_pos_kernel_size",
                     "our conv positions use kernels of max(3, conv_pos_width // conv_pos_depth) >= 3")
    hf.refuse_unless(D % groups == 0, "num_conv_pos_embedding_groups", f"must divide hidden_size {D}")

    sd = {}
    for i in range(len(CONV_LAYERS)):
        sd[f"frontend.cnn.{3 * i}.weight"] = hf.t(f"feature_extractor.conv_layers.{i}.conv.weight")
        hf.lin(sd, f"frontend.cnn.{3 * i + 1}.norm", f"feature_extractor.conv_layers.{i}.layer_norm")
    hf.lin(sd, "frontend.feat_norm", "feature_projection.layer_norm")
    hf.lin(sd, "frontend.feat_proj", "feature_projection.projection")
    for i in range(n_pos):
        hf.lin(sd, f"frontend.pos_conv.{i}.0", f"encoder.pos_conv_embed.layers.{i}.conv")
    hf.lin(sd, "frontend.pos_norm", "encoder.layer_norm")
    if "masked_spec_embed" in hf.sd:  # created by HF when its time masks are on: the pretrained mask embedding
        sd[MASK_EMB] = hf.t("masked_spec_embed")
    for i in range(depth):
        p, o = f"encoder.layers.{i}", f"encoder.blocks.{i}"
        hf.qkv(sd, f"{o}.attn.qkv", f"{p}.attention.q_proj", f"{p}.attention.k_proj", f"{p}.attention.v_proj")
        hf.lin(sd, f"{o}.attn.proj", f"{p}.attention.out_proj")
        hf.lin(sd, f"{o}.norm1", f"{p}.layer_norm")
        hf.lin(sd, f"{o}.fc1", f"{p}.feed_forward.intermediate_dense")
        hf.lin(sd, f"{o}.fc2", f"{p}.feed_forward.output_dense")
        hf.lin(sd, f"{o}.norm2", f"{p}.final_layer_norm")
    return hf.finish("audio", _encoder_dict(D, depth, heads, ratio, False),
                     {"conv_channels": dims[0], "conv_pos_width": width, "conv_pos_depth": n_pos,
                      "conv_pos_groups": groups}, sd, ignorable=())


# ----------------------------------------------------------------------------- text
def _text(hf: _HF) -> InitCheckpoint:
    """Data2VecText (RoBERTa layout, post-LN) → our text encoder."""
    D, depth, heads, ratio = hf.common()
    hf.refuse_unless(hf.get("position_embedding_type", "absolute") == "absolute", "position_embedding_type",
                     "only absolute learned positions are modelled")
    hf.refuse_unless(not hf.get("is_decoder", False), "is_decoder", "our text encoder is bidirectional")
    hf.refuse_unless(not hf.get("add_cross_attention", False), "add_cross_attention", "cross-attention is not modelled")
    hf.refuse_unless(hf.get("pad_token_id", 1) == 1, "pad_token_id", "our text front end pads with id 1 (<pad>)")
    n_pos = hf.get("max_position_embeddings", 512)
    P = n_pos - 2  # RoBERTa: rows 0, 1 (padding_idx) unused; our position i is row i + 2
    hf.refuse_unless(P >= 8, "max_position_embeddings", "leaves fewer than 8 positions (rows 2…)")
    V = hf.get("vocab_size", 30522)

    sd = {"frontend.tokens.weight": hf.t("embeddings.word_embeddings.weight")}
    pos, types = hf.t("embeddings.position_embeddings.weight"), hf.t("embeddings.token_type_embeddings.weight")
    # HF adds token type 0 to every token (we have no token types): fold it into our positions.
    sd["frontend.positions.weight"] = pos[2:2 + P] + types[0]
    hf.lin(sd, "frontend.norm", "embeddings.LayerNorm")
    for i in range(depth):
        p, o = f"encoder.layer.{i}", f"encoder.blocks.{i}"
        hf.qkv(sd, f"{o}.attn.qkv", f"{p}.attention.self.query", f"{p}.attention.self.key",
               f"{p}.attention.self.value")
        hf.lin(sd, f"{o}.attn.proj", f"{p}.attention.output.dense")
        hf.lin(sd, f"{o}.norm1", f"{p}.attention.output.LayerNorm")
        hf.lin(sd, f"{o}.fc1", f"{p}.intermediate.dense")
        hf.lin(sd, f"{o}.fc2", f"{p}.output.dense")
        hf.lin(sd, f"{o}.norm2", f"{p}.output.LayerNorm")
    return hf.finish("text", _encoder_dict(D, depth, heads, ratio, False),
                     {"vocab_size": V, "max_positions": P}, sd,
                     ignorable=("pooler.", "position_ids", "token_type_ids"))


# ----------------------------------------------------------------------------- applying
def init_model_config(base: ModelConfig, init: InitCheckpoint) -> ModelConfig:
    """`base` (the user's preset / recipe, with the data's front-end settings) with the encoder and
    front-end fields the checkpoint fixes replaced by the checkpoint's; everything else (mode,
    dropout, masking, targets, EMA, decoder, image_size, text mask_id) stays the recipe's. Raises
    ConfigError naming `init` when the modality or the data does not fit the checkpoint."""
    where = f"init: {init.path!r}"
    if base.modality != init.modality:
        raise ConfigError(f"{where} is a {init.modality} checkpoint but the model is {base.modality}")
    if base.modality == "text" and base.frontend.vocab_size > init.frontend["vocab_size"]:
        raise ConfigError(f"{where}: the data's tokenizer has {base.frontend.vocab_size} ids but the checkpoint "
                          f"embeds {init.frontend['vocab_size']}; preprocess with the checkpoint's tokenizer "
                          "(--tokenizer DIR)")
    try:
        return dataclasses.replace(base, encoder=dataclasses.replace(base.encoder, **init.encoder),
                                   frontend=dataclasses.replace(base.frontend, **init.frontend))
    except ConfigError as e:
        raise ConfigError(f"{where}: the checkpoint's architecture does not fit the recipe: {e}") from None


@torch.no_grad()
def apply_init(model, init: InitCheckpoint) -> None:
    """Load the checkpoint's student front end + encoder into `model` (a Data2Vec built from
    `init_model_config(…, init)`; every frontend./encoder. weight must be provided with its shape,
    else ValueError naming the keys), then start the teacher as a copy of the imported student:
    its encoder and, where the teacher owns front-end parts (EMAConfig.ema_local / ema_context),
    those parts. The 1.0 head / 2.0 decoder keep their fresh initialisation."""
    if model.cfg.modality != init.modality:
        raise ValueError(f"init: {init.path!r} is a {init.modality} checkpoint but the model is {model.cfg.modality}")
    want = {k: v for k, v in model.state_dict().items() if k.startswith(STUDENT)}
    state = dict(init.state)
    if MASK_EMB in state and getattr(model, MASK_EMB, None) is not None:
        want[MASK_EMB] = model.mask_emb  # 1.0 ← 1.0: the pretrained mask embedding goes on
    else:
        state.pop(MASK_EMB, None)  # 2.0 drops masked steps; a 1.0 model without one keeps its fresh one
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(want[k].shape)}"
              for k in sorted(set(want) & set(state)) if state[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"init: {init.path!r} does not fit this model (build it with init_model_config): "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {shapes[:5]}")
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    model.teacher_encoder.load_state_dict(model.encoder.state_dict())
    if model.teacher_frontend is not None:
        student = model.frontend.state_dict()
        model.teacher_frontend.load_state_dict({k: student[k] for k in model.teacher_frontend.state_dict()})
