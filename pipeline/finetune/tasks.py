"""Fine-tuning targets, batches and metrics: labels/transcripts ↔ ids, collation, evaluation. No Ray.

    classify: label strings ─(sorted training labels)─► class ids; metric: accuracy
    ctc:      transcripts ─(character vocabulary of the training transcripts)─► ids;
              greedy CTC decoding; metrics: CER and WER (jiwer)

Also the label-fraction subset: a seeded, class-stratified share of a labeled folder written as a
new preprocessed folder, so training streams it like any other.
"""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.model.frontends import conv_frames
from pipeline.train.batches import audio_tensor, eval_inputs, image_tensor, text_tensor
from pipeline.train.stream import COLUMNS

# CTC vocabulary: blank first (Hugging Face's Wav2Vec2 CTC uses the pad id as blank), "|" between
# words, then the training transcripts' characters.
CTC_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "|"]
BLANK, UNK, WORD = 0, 3, 4


def target_column(task: str) -> str:
    return "transcript" if task == "ctc" else "label"


def normalize_transcript(text: str) -> str:
    """Lowercase, single spaces; a literal "|" (the word delimiter's symbol) becomes a space."""
    return " ".join(str(text).lower().replace("|", " ").split())


def build_vocab(transcripts) -> list[str]:
    """CTC vocabulary: CTC_SPECIALS + the sorted characters of the (normalized) transcripts."""
    chars = sorted({ch for t in transcripts for ch in normalize_transcript(t) if ch != " "})
    return CTC_SPECIALS + chars


def encode_transcript(text: str, index: dict[str, int]) -> list[int]:
    return [WORD if ch == " " else index.get(ch, UNK) for ch in normalize_transcript(text)]


def decode_ids(ids, vocab: list[str]) -> str:
    return "".join(" " if i == WORD else vocab[i] for i in ids if i >= WORD).strip()


def greedy_ctc(logits: torch.Tensor, frames: torch.Tensor, vocab: list[str]) -> list[str]:
    """(B, T, V) logits, valid frames (B,) → transcripts: best id per frame, repeats merged, blanks
    (and the unused specials) dropped."""
    best = logits.argmax(-1).cpu().numpy()
    out = []
    for row, n in zip(best, frames.tolist()):
        row = row[:n]
        keep = row[np.r_[True, row[1:] != row[:-1]]] if len(row) else row
        out.append(" ".join(decode_ids(keep, vocab).split()))
    return out


class Targets:
    """Maps a batch's label or transcript column to training targets, for one task."""

    def __init__(self, task: str, labels: list[str]):
        self.task, self.labels = task, labels
        self.index = {s: i for i, s in enumerate(labels)}

    def __call__(self, column) -> dict[str, torch.Tensor]:
        if self.task == "classify":
            return {"labels": torch.tensor([self.index[str(v)] for v in column], dtype=torch.long)}
        seqs = [encode_transcript(t, self.index) for t in column]
        return {"targets": torch.tensor([i for s in seqs for i in s], dtype=torch.long),  # concatenated
                "target_lengths": torch.tensor([len(s) for s in seqs], dtype=torch.long)}


def collate(batch: dict, modality: str, model_cfg, targets: Targets, rng: np.random.Generator, t,
            mask_prob: float = 0.0, mask_length: int = 10) -> tuple[dict, dict, torch.Tensor | None]:
    """A numpy training batch → (model inputs, targets, time mask (B, T) bool or None).

    Audio clips are never cropped for CTC (the transcript covers the whole clip); for
    classification, clips longer than train.audio_max_samples are randomly cropped."""
    from pipeline import masking

    B = len(batch[target_column(targets.task)])
    rngs = rng.spawn(B) if isinstance(rng, np.random.Generator) else list(rng)  # one per sample
    mask = None
    if modality == "image":
        inputs = {"image": image_tensor(batch["image"], model_cfg.frontend.image_size)}
    elif modality == "audio":
        limit = 10 ** 9 if targets.task == "ctc" else t.audio_max_samples
        wav, lengths = audio_tensor(batch["audio"], limit, rngs, "pad")
        inputs = {"audio": wav, "lengths": lengths}
        if mask_prob > 0:  # each clip's time masks from its own generator, over its own frames
            frames = conv_frames(lengths).numpy()
            T = int(conv_frames(wav.shape[1]))
            mask = torch.from_numpy(np.stack([
                np.pad(masking.span_mask([n], int(n), mask_prob, mask_length, r, min_masks=0, require_same=False)[0],
                       (0, T - int(n))) for r, n in zip(rngs, frames)]))
    else:
        inputs = {"input_ids": text_tensor(batch["input_ids"], min(t.text_max_tokens, model_cfg.frontend.max_positions))}
    return inputs, targets(batch[target_column(targets.task)]), mask


def loss_fn(model, out, y: dict, label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (classify), or CTC loss per clip (fairseq `sentence_avg`: normalized by clips),
    with `zero_infinity` so a clip too short for its transcript adds no NaN. `reduction`: "mean"
    over the batch's samples, or "sum" (the step divides by the global batch, finetune/step.py)."""
    if model.task == "classify":
        return F.cross_entropy(out.float(), y["labels"], label_smoothing=label_smoothing, reduction=reduction)
    logits, pad = out
    T = logits.shape[1]
    frames = torch.full((logits.shape[0],), T, dtype=torch.long) if pad is None else (~pad).sum(1).cpu()
    logp = F.log_softmax(logits.float(), -1).transpose(0, 1)  # (T, B, V)
    total = F.ctc_loss(logp, y["targets"], frames, y["target_lengths"], blank=BLANK, reduction="sum",
                       zero_infinity=True)
    return total if reduction == "sum" else total / logits.shape[0]


@torch.no_grad()
def evaluate(model, rows: dict, targets: Targets, device, batch_size: int = 32,
             autocast=None) -> dict[str, float]:
    """Metrics of `model` on every row of `rows` (numpy columns incl. the target column), without
    random crops or masks: classify → accuracy, loss; ctc → cer, wer, loss. Audio goes through in
    length-sorted batches (less padding)."""
    import jiwer

    from contextlib import nullcontext

    autocast = autocast or nullcontext
    m, f = model.cfg.modality, model.cfg.frontend
    col = target_column(targets.task)
    n = len(rows[col])
    order = np.argsort([len(a) for a in rows["audio"]], kind="stable") if m == "audio" else np.arange(n)
    was = model.training
    model.eval()
    correct, loss, hyps, refs = 0, 0.0, [], []
    try:
        for a in range(0, n, batch_size):
            idx = order[a: a + batch_size]
            b = {c: rows[c][idx] for c in COLUMNS[m] + [col]}
            inputs = {k: v.to(device) for k, v in eval_inputs(b, m, f.image_size, f.max_positions).items()}
            y = {k: v.to(device) for k, v in targets(b[col]).items()}
            with autocast():
                out = model(inputs)
            loss += float(loss_fn(model, out, y)) * len(idx)
            if targets.task == "classify":
                correct += int((out.argmax(-1) == y["labels"]).sum())
            else:
                logits, pad = out
                frames = torch.full((len(idx),), logits.shape[1]) if pad is None else (~pad).sum(1)
                hyps += greedy_ctc(logits.float(), frames, targets.labels)
                refs += [normalize_transcript(t) for t in b[col]]
    finally:
        model.train(was)
    if targets.task == "classify":
        return {"accuracy": correct / n, "loss": loss / n}
    return {"cer": float(jiwer.cer(refs, hyps)), "wer": float(jiwer.wer(refs, hyps)), "loss": loss / n,
            "examples": json.dumps(list(zip(refs[:3], hyps[:3])))}


def fraction_indices(values: np.ndarray, fraction: float, seed: int, stratified: bool) -> np.ndarray:
    """Sorted indices of a seeded `fraction` of rows: per class (at least one row of each) when
    `stratified`, else of all rows (at least one)."""
    rng = np.random.default_rng([seed, 1299709])
    if not stratified:
        return np.sort(rng.permutation(len(values))[: max(1, round(fraction * len(values)))])
    keep = []
    for c in sorted(set(values.tolist())):
        idx = rng.permutation(np.flatnonzero(values == c))
        keep += idx[: max(1, round(fraction * len(idx)))].tolist()
    return np.sort(np.asarray(keep, dtype=np.int64))


def write_fraction(src: str, dst: str, column: str, fraction: float, seed: int, stratified: bool,
                   rest: str | None = None) -> dict:
    """Write the rows `fraction_indices` picks from preprocessed folder `src` as a preprocessed
    folder `dst` (shards in the modality's ROW_GROUP_ROWS row groups, the manifest with updated counts), reading
    one row group at a time; with `rest`, the other rows go there (a train/validation split). Rows
    without a target are dropped. Returns dst's manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import storage
    from pipeline.config import ROW_GROUP_ROWS

    fs, root = storage.resolve(src)
    files = storage.shard_files(fs, root)
    values, where = [], []  # target value and (file, row group, row) of every labeled row
    for fi, f in enumerate(files):
        with fs.open_input_file(f) as fh:
            pf = pq.ParquetFile(fh)
            for g in range(pf.num_row_groups):
                col = pf.read_row_group(g, columns=[column]).column(0).to_pylist()
                for r, v in enumerate(col):
                    if v is not None and str(v).strip():
                        values.append(str(v))
                        where.append((fi, g, r))
    keep = set(fraction_indices(np.asarray(values), fraction, seed, stratified).tolist())
    parts = {dst: {}, **({rest: {}} if rest else {})}
    for i, (fi, g, r) in enumerate(where):
        target = dst if i in keep else rest
        if target:
            parts[target].setdefault((fi, g), []).append(r)
    manifest = json.loads(storage.read_text(fs, f"{root}/manifest.json"))
    group_rows = ROW_GROUP_ROWS[manifest["modality"]]
    out_manifest = None
    for out, chosen in parts.items():
        ofs, oroot = storage.resolve(out)
        ofs.create_dir(f"{oroot}/shards", recursive=True)
        writer, buffer = None, []  # picked rows wait until they fill a whole row group

        def flush(tables: list, final: bool) -> list:
            nonlocal writer
            t = pa.concat_tables(tables)
            whole = t.num_rows if final else t.num_rows // group_rows * group_rows
            if whole:
                writer = writer or pq.ParquetWriter(stream, t.schema)
                writer.write_table(t.slice(0, whole), row_group_size=group_rows)
            return [t.slice(whole)] if whole < t.num_rows else []

        with ofs.open_output_stream(f"{oroot}/shards/part-0.parquet") as stream:
            for fi, f in enumerate(files):
                with fs.open_input_file(f) as fh:
                    pf = pq.ParquetFile(fh)
                    for g in range(pf.num_row_groups):
                        if (fi, g) in chosen:
                            buffer.append(pf.read_row_group(g).take(pa.array(chosen[fi, g])))
                            if sum(t.num_rows for t in buffer) >= group_rows:
                                buffer = flush(buffer, final=False)
            if buffer:
                flush(buffer, final=True)
            if writer:
                writer.close()
        n = sum(len(v) for v in chosen.values())
        mine = {values[i] for i, (fi, g, r) in enumerate(where) if r in chosen.get((fi, g), ())}
        labels = sorted(mine) if column == "label" else manifest.get("labels", [])
        m = {**manifest, "counts": {**manifest["counts"], "written": n}, "labels": labels,
             "subset_of": {"data": src, "fraction": fraction if out == dst else 1 - fraction, "seed": seed,
                           "stratified": stratified, "rows_with_target": len(values),
                           "part": "picked" if out == dst else "rest"}}
        storage.write_json(ofs, f"{oroot}/manifest.json", m)
        out_manifest = out_manifest or m
    return out_manifest
