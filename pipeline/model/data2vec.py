"""data2vec 1.0 and 2.0 student/teacher for image, audio and text. Pure PyTorch, no Ray.

    batch ──front end──► local features x (B,T,D)
      teacher (EMA, eval, no grad): full input ─► encoder ─► top-K layers ─► targets y (B,T,D)
      student 1.0: x with mask embeddings ─► encoder ─► linear head ─► predictions at masked steps
      student 2.0: only unmasked tokens of `clone_batch` masked copies ─► encoder ─► noise-filled
                   full sequence ─► conv decoder ─► predictions at masked steps (one teacher pass)
    loss = regression(pred, y) summed over masked, non-padded steps (`loss_positions`) / their
           count; the training step divides the sums by the *global* count instead (train/step.py)

Masks come in as data (B·C, T) bool, True = masked; `draw_masks` makes them from numpy.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from pipeline import masking
from pipeline.model.config import ModelConfig
from pipeline.model.ema import ema_decay_at, ema_update
from pipeline.model.encoder import Encoder
from pipeline.model.frontends import Decoder, build_frontend, conv_frames, regression_head
from pipeline.model.objective import check_step, feature_std, make_targets, regression_sum

# Sub-modules of each front end that form its *local* encoder (the rest is the context part).
LOCAL_PARTS = {"image": ("proj",), "audio": ("cnn", "feat_norm", "feat_proj"), "text": ("tokens",)}


@contextmanager
def _dropout_off(module: nn.Module):
    """Run `module` in eval mode (no dropout) and restore each sub-module's mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@dataclass
class Output:
    loss: torch.Tensor
    """This batch's loss: `sum` / `count` (+ the CLS term, cls_loss × `cls_sum`)."""
    target_var: torch.Tensor
    pred_var: torch.Tensor
    num_masked: int
    sum: torch.Tensor | None = None
    """The regression loss summed over the `count` loss positions."""
    count: int = 0
    cls_sum: torch.Tensor | float = 0.0
    """2.0 with a CLS loss: the CLS regression summed over the B·C rows (unweighted)."""


class Data2Vec(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.frontend = build_frontend(cfg)
        self.encoder = Encoder(cfg.encoder)
        D = cfg.encoder.dim
        if cfg.mode == "d2v1":
            self.head = regression_head(cfg)
            if cfg.modality != "text":  # text masks at the token level (<mask> id)
                self.mask_emb = nn.Parameter(torch.zeros(D).uniform_())
        else:
            self.decoder = Decoder(cfg, self.frontend.grid)
        # ---- teacher: EMA copies of the encoder (+ front-end parts per EMAConfig), always eval.
        self.teacher_encoder = copy.deepcopy(self.encoder)
        self.teacher_frontend = None
        if cfg.ema.ema_local or cfg.ema.ema_context:
            self.teacher_frontend = copy.deepcopy(self.frontend)
            if not cfg.ema.ema_local:
                for name in LOCAL_PARTS[cfg.modality]:
                    delattr(self.teacher_frontend, name)
        for p in self.teacher_parameters():
            p.requires_grad_(False)
        self._ema_pairs = self._pair_teacher_with_student()
        self.train()

    # ------------------------------------------------------------------ parameters / EMA
    def teacher_modules(self) -> list[nn.Module]:
        return [m for m in (self.teacher_encoder, self.teacher_frontend) if m is not None]

    def teacher_parameters(self):
        for m in self.teacher_modules():
            yield from m.parameters()

    def student_parameters(self):
        teacher = {id(p) for p in self.teacher_parameters()}
        return [p for p in self.parameters() if id(p) not in teacher]

    def _pair_teacher_with_student(self):
        pairs = [(t, s) for t, s in zip(self.teacher_encoder.parameters(), self.encoder.parameters())]
        if self.teacher_frontend is not None:
            student = dict(self.frontend.named_parameters())
            pairs += [(t, student[n]) for n, t in self.teacher_frontend.named_parameters()]
        return pairs

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.teacher_modules():
            m.eval()  # the teacher never uses dropout
        return self

    @torch.no_grad()
    def ema_step(self, step: int) -> float:
        """Move the teacher towards the student with the decay scheduled for `step`."""
        e = self.cfg.ema
        decay = ema_decay_at(step, e.decay, e.end_decay, e.anneal_end_step)
        t, s = zip(*self._ema_pairs)
        ema_update(list(t), list(s), decay)
        return decay

    def compile_modules(self) -> None:
        """torch.compile the heavy modules in place (state-dict keys unchanged). Their input
        shapes are fixed per batch shape — 2.0 masks hide an exact count of steps — so a run
        compiles once per input shape; audio's varying lengths become a dynamic dimension after
        the first recompile."""
        for m in (self.encoder, self.teacher_encoder, getattr(self, "decoder", None), getattr(self, "head", None)):
            if m is not None:
                m.compile()

    # ------------------------------------------------------------------ forward
    def num_tokens(self, batch: dict) -> int:
        """Sequence length T the masks must have for this batch."""
        if self.cfg.modality == "image":
            h, w = self.frontend.grid
            return h * w
        if self.cfg.modality == "audio":
            return int(conv_frames(batch["audio"].shape[-1]))
        return batch["input_ids"].shape[1]

    @torch.no_grad()
    def targets(self, batch: dict, x: torch.Tensor | None, pad) -> torch.Tensor:
        """Teacher pass on the unmasked input → targets (B, T, D) in fp32.

        `x` is the student's local features of the *unmasked* input when the teacher may reuse
        them (audio: the teacher is fed the student's CNN features, as in the reference)."""
        fe_t = self.teacher_frontend
        # The teacher never sees dropout, also where it borrows the student's front end (text:
        # embeddings + their dropout; audio: the conv positions) — fairseq runs the EMA teacher
        # in eval mode (`self.ema.model.eval()`).
        with _dropout_off(self.frontend):
            if self.cfg.ema.ema_local:
                x, pad = fe_t.local(batch)
            elif x is None:
                x, pad = self.frontend.local(batch)
            x = x.detach()
            ctx_fe = fe_t if self.cfg.ema.ema_context else self.frontend
            h = ctx_fe.context(x, pad)
        h, hpad = ctx_fe.prepend(h, pad)
        _, layers = self.teacher_encoder(h, hpad, layers=self.cfg.encoder.layer_output)
        n = self.frontend.num_extra
        top = [l[:, n:] for l in layers[-self.cfg.target.top_k:]]
        t = self.cfg.target
        return make_targets(top, pad, t.layer_norm, t.final_norm)

    def loss_positions(self, batch: dict, mask: torch.Tensor) -> torch.Tensor:
        """(B or B·C, T) bool: the steps the loss is taken at — masked and not padding (text 1.0:
        where the student sees <mask>). Its sum is the batch's sample size (fairseq
        `sample_size`), known before the forward: the step normalizes by the global one."""
        cfg = self.cfg
        T = mask.shape[1]
        if "lengths" in batch:  # audio: frames past a clip's end
            pad = torch.arange(T, device=mask.device)[None, :] >= conv_frames(batch["lengths"].long())[:, None]
        elif "input_ids" in batch:
            pad = batch["input_ids"] == self.frontend.PAD
        else:
            pad = None
        if pad is not None and mask.shape[0] != pad.shape[0]:  # 2.0: C masked copies per sample
            pad = pad.repeat_interleave(mask.shape[0] // pad.shape[0], 0)
        sel = mask if pad is None else mask & ~pad.to(mask.device)
        if cfg.mode == "d2v1" and cfg.modality == "text":
            # fairseq data2vec_text.py: `masked_indices = src_tokens.eq(self.mask_idx)` — the loss
            # covers the steps the student sees as <mask>, not the 10% random / 10% kept ones.
            sel = sel & (batch["input_ids_masked"] == cfg.frontend.mask_id)
        return sel

    def forward(self, batch: dict, mask: torch.Tensor) -> Output:
        if self.cfg.mode == "d2v1":
            return self._forward_v1(batch, mask)
        return self._forward_v2(batch, mask)

    def _forward_v1(self, batch, mask):
        cfg = self.cfg
        if cfg.modality == "text":
            y = self.targets(batch, None, None)  # teacher sees the original ids
            x, pad = self.frontend.local({"input_ids": batch["input_ids_masked"]})
            pad = batch["input_ids"] == self.frontend.PAD
        else:
            x, pad = self.frontend.local(batch)
            y = self.targets(batch, x, pad)
            x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)  # (B,T,D)
        h = self.frontend.context(x, pad)
        h, hpad = self.frontend.prepend(h, pad)
        h, _ = self.encoder(h, hpad)
        h = h[:, self.frontend.num_extra:]  # (B, T, D)
        sel = self.loss_positions(batch, mask)
        pred = self.head(h[sel])  # (N, D)
        return self._loss(pred, y[sel])

    def _forward_v2(self, batch, mask):
        cfg = self.cfg
        C = cfg.decoder.clone_batch
        x, pad = self.frontend.local(batch)  # (B, T, D)
        y = self.targets(batch, x, pad)  # (B, T, D): one teacher pass for C masks
        B, T, D = x.shape
        assert mask.shape == (B * C, T), f"mask {tuple(mask.shape)} != ({B}*{C}, {T})"
        y = y.repeat_interleave(C, 0)
        if self.frontend.mixes_steps:  # audio: conv positions must not carry masked content
            x, pad = x.repeat_interleave(C, 0), None if pad is None else pad.repeat_interleave(C, 0)
            h = self.frontend.context(x, pad, mask)  # (B·C, T, D)
        else:  # fixed/learned absolute positions: compute once, then clone
            h = self.frontend.context(x, pad).repeat_interleave(C, 0)  # (B·C, T, D)
            pad = None if pad is None else pad.repeat_interleave(C, 0)
        # Keep the unmasked tokens in their original order: a stable sort puts False first.
        n_keep = int((~mask[0]).sum())
        ids_keep = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :n_keep]  # (B·C, K)
        vis = torch.gather(h, 1, ids_keep[..., None].expand(-1, -1, D))  # (B·C, K, D)
        vis_pad = None if pad is None else torch.gather(pad, 1, ids_keep)
        vis, vis_pad = self.frontend.prepend(vis, vis_pad)
        enc, _ = self.encoder(vis, vis_pad)  # (B·C, n_extra + K, D)
        n = self.frontend.num_extra
        cls_out, enc = enc[:, :n], enc[:, n:]
        # Decoder input: noise at masked steps, encoder outputs back at their positions.
        full = torch.randn(B * C, T, D, device=enc.device, dtype=enc.dtype) * cfg.decoder.mask_noise_std
        full = full.scatter(1, ids_keep[..., None].expand(-1, -1, D), enc)
        pred = self.decoder(full, pad)  # (B·C, T, D)
        sel = self.loss_positions(batch, mask)
        out = self._loss(pred[sel], y[sel])
        if n and cfg.decoder.cls_loss > 0:  # image 2.0: CLS regresses the mean target
            # fairseq data2vec2.py adds d2v_loss(cls_pred, cls_target) * cls_loss * sample_size,
            # and the trainer divides every loss by sample_size (masked tokens): the CLS term is
            # cls_loss × the *sum* over the B·C clones of the per-sample loss (train/step.py
            # keeps that weight per configured per-worker batch whatever the split).
            cls_target = y.mean(1)  # (B·C, D)
            out.cls_sum = regression_sum(cls_out[:, 0], cls_target, cfg.loss.beta, cfg.loss.scale)
            out.loss = out.loss + cfg.decoder.cls_loss * out.cls_sum
        return out

    def _loss(self, pred, target) -> Output:
        total = regression_sum(pred, target, self.cfg.loss.beta, self.cfg.loss.scale)
        n = int(pred.shape[0])
        return Output(loss=total / max(n, 1), target_var=feature_std(target), pred_var=feature_std(pred),
                      num_masked=n, sum=total, count=n)

    def check(self, out: Output, step: int) -> None:
        """Collapse guard and finite-loss check (raises RepresentationCollapse / NonFiniteLoss)."""
        c = self.cfg.collapse
        check_step(out.loss, float(out.target_var), float(out.pred_var), step,
                   c.min_target_var, c.min_pred_var, c.warmup_steps)

    # ------------------------------------------------------------------ encoder for probes/export
    @torch.no_grad()
    def extract(self, batch: dict, layers: tuple[int, ...] = (-1,), teacher: bool = False) -> torch.Tensor:
        """Mean-pooled (over real steps) features (B, D), averaged over the chosen layers' block
        outputs; -1 is the encoder's final output."""
        fe = self.frontend
        x, pad = fe.local(batch)
        h = fe.context(x, pad)
        h, hpad = fe.prepend(h, pad)
        enc = self.teacher_encoder if teacher else self.encoder
        final, outs = enc(h, hpad, layers="block")
        feats = [final if i == -1 else outs[i] for i in layers]
        f = torch.stack(feats).mean(0)[:, fe.num_extra:]  # (B, T, D)
        if pad is None:
            return f.mean(1)
        w = (~pad).to(f.dtype)[..., None]
        return (f * w).sum(1) / w.sum(1).clamp(min=1)


def draw_masks(cfg: ModelConfig, batch_size: int, T: int, rng,
               lengths: np.ndarray | None = None, input_ids: np.ndarray | None = None) -> dict:
    """Masks for one batch, as numpy (usable in a Ray Data map task or a collate function).

    Returns {"mask": (B or B·clone_batch, T) bool} and, for text 1.0, {"input_ids_masked"}.
    `rng`: one generator per sample (batches.sample_rngs: seeded by the sample's row and the
    step), or one generator, split into one per sample. `lengths`: valid steps per sample (audio
    frames / text tokens); None = all T valid.

    Each sample's masks are drawn from its own generator over its own length, so they do not
    depend on the other samples of its micro-batch: any cut of a step into micro-batches and
    workers draws the same masks (train/step.py). Deviations that follows from it: data2vec 1.0
    audio draws each clip's span count from its own length (fairseq `require_same_masks` trims
    every row to the batch's smallest count); 2.0 audio/text mask each sample's own frames and
    keep as many padding steps as make every row keep the same number of steps (the student
    encodes an equal count per row; padding is no attention key and takes no loss).
    """
    m = cfg.mask
    B = batch_size
    rngs = rng.spawn(B) if isinstance(rng, np.random.Generator) else list(rng)
    assert len(rngs) == B, (len(rngs), B)
    lengths = np.full(B, T) if lengths is None else np.asarray(lengths)
    if cfg.mode == "d2v2":
        C = cfg.decoder.clone_batch
        if cfg.modality == "image":
            h = w = int(round(T ** 0.5))
            return {"mask": np.concatenate([masking.inverse_block_mask(C, (h, w), m.prob, r, block=m.length,
                                                                       adjust=m.adjust) for r in rngs])}
        rows = []
        for r, n in zip(rngs, lengths):
            n = int(n)
            if cfg.modality == "audio":
                rows.append(masking.inverse_block_mask(C, (n,), m.prob, r, block=m.length, adjust=m.adjust,
                                                       inverse=False))
            else:
                rows.append(masking.random_mask(C, n, m.prob, r))
        return {"mask": _pad_keeping_equal(rows, T)}
    if cfg.modality == "image":
        h = w = int(round(T ** 0.5))
        return {"mask": np.concatenate([masking.beit_block_mask(1, h, w, int(round(m.prob * T)), r,
                                                                min_block=m.min_block) for r in rngs])}
    mask = np.zeros((B, T), bool)
    if cfg.modality == "audio":
        for i, (r, n) in enumerate(zip(rngs, lengths)):
            mask[i, :n] = masking.span_mask([n], int(n), m.prob, m.length, r)[0]
        return {"mask": mask}
    corrupted = input_ids.copy()
    mask_id, V = cfg.frontend.mask_id, cfg.frontend.vocab_size
    # Random replacements are non-special ids: <s>, <pad>, </s>, <unk> are 0-3 and <mask> is 4
    # (tokenizers trained here) or, RoBERTa-style, the last id.
    lo, hi = (5, V) if mask_id == 4 else (4, mask_id if mask_id == V - 1 else V)
    for i, (r, n) in enumerate(zip(rngs, lengths)):
        n = int(n)
        mask[i, :n] = masking.token_mask([n], n, m.prob, r, span=m.length)[0]
        ids = input_ids[i: i + 1, :n]
        corrupted[i, :n] = (masking.corrupt_tokens(ids, mask[i: i + 1, :n], r, mask_id, hi, num_special=lo)[0]
                            if m.bert_corrupt else np.where(mask[i, :n], mask_id, ids[0]))
    return {"mask": mask, "input_ids_masked": corrupted}


def _pad_keeping_equal(rows: list[np.ndarray], T: int) -> np.ndarray:
    """Per-sample 2.0 masks (C, n_i) → (B·C, T): past each sample's n_i steps, the first padding
    steps are kept (False) until every row keeps as many steps as the row keeping the most, the
    rest masked. Masked counts grow with length, so a row of length n_i always has the room."""
    keep = max(int((~r).sum(1).max()) for r in rows)
    out = np.ones((sum(len(r) for r in rows), T), bool)
    i = 0
    for r in rows:
        n = r.shape[1]
        out[i: i + len(r), :n] = r
        for j, row_keep in enumerate((~r).sum(1)):
            extra = keep - int(row_keep)
            assert extra <= T - n, (keep, int(row_keep), T, n)
            out[i + j, n: n + extra] = False
        i += len(r)
    return out
