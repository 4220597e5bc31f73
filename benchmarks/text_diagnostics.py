"""Why the demo's text encoder does not move a probe, measured: what a 128-d feature can reach,
what the teacher's targets are made of, and whether pretraining teaches word order.

    .venv/bin/python -m benchmarks.text_diagnostics [--data runs/demo/data] [--steps 600] [--every 300]
        [--position-init-scale 1.0] [--init-embeddings random|cooccurrence] [--set model.ema.decay=0.99 ...]
        [--probe-rows N]

`--data` holds the demo's preprocessed text folders (`python -m jobs.demo` writes them):
text_pretrain (unlabeled corpus + tokenizer), text_train / text_test (topic labels).

1. Ceilings of the topic probe without pretraining: TF-IDF of token ids (fit on the pretraining
   corpus) → logistic regression; its LSA projections to 128 / 512 dimensions (the demo
   encoder's width / 4× it), a linear summary of the words; and the mean of 128- / 512-d
   co-occurrence word vectors (PPMI-SVD over the pretraining rows), which is what mean pooling
   could give once the embeddings encode which words share rows.
2. Teacher targets: the share of their variance explained by the token's position alone and by its
   identity alone (R² of the per-group means), and the student's R² at masked tokens.
3. Training with the workers' step (benchmarks/harness.py, demo preset, d2v2 unless --set; the R²
   columns of step 2 only for d2v2, whose decoder they read), probing
   every `--every` steps: the topic probe (mean-pooled final layer, and the mean of the student's
   input token embeddings, "topic_emb") and a word-order probe: each
   labeled row, with probability ½, gets two adjacent tokens swapped (SentEval's "bigram shift"
   task at the sub-word level); a linear probe must tell shifted from original.
Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.harness import Trainer, batches, demo_run_config, load_rows, probe_accuracy  # noqa: E402
from pipeline.probe import fit_probes  # noqa: E402
from pipeline.train.batches import collate, step_rng  # noqa: E402
from pipeline.train.config import parse_sets  # noqa: E402


def text_splits(data: str, probe_rows: int = 0):
    """(pretraining rows, labeled train rows, labeled test rows) of the demo's text folders under
    `data`, or None after saying what is missing. `probe_rows` > 0 keeps a seeded random subset of
    that many rows of each labeled split (not the first rows: labeled folders are often sorted by
    class)."""
    try:
        pre = load_rows(os.path.join(data, "text_pretrain"), "text")
        tr, te = (load_rows(os.path.join(data, f"text_{s}"), "text", labeled=True) for s in ("train", "test"))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e} (run `python -m jobs.demo --modalities text` first, or pass --data)", file=sys.stderr)
        return None
    if probe_rows:
        tr, te = ({k: [v[i] for i in np.random.default_rng(0).permutation(len(v))[:probe_rows]]
                   for k, v in r.items()} for r in (tr, te))
    return pre, tr, te


def _docs(rows) -> list[str]:
    return [" ".join(map(str, ids[1:-1])) for ids in rows["input_ids"]]  # token ids as "words"


def ppmi_matrix(rows, vocab_size: int) -> np.ndarray:
    """Positive pointwise mutual information of token ids co-occurring in a row (document-level
    window, presence not counts, <s>/</s> left out): PPMI[a, b] = max(0, log(C[a,b]·N / (C[a]·C[b])))
    with C[a,b] = rows holding both a ≠ b, C[a] = Σ_b C[a,b], N = Σ C; 0 where C[a,b] = 0. (V, V)."""
    import scipy.sparse as sp

    r, c = [], []
    for i, ids in enumerate(rows["input_ids"]):
        uniq = np.unique(np.asarray(ids[1:-1]))
        r.extend([i] * len(uniq))
        c.extend(uniq.tolist())
    x = sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(rows["input_ids"]), vocab_size))
    co = (x.T @ x).toarray()
    np.fill_diagonal(co, 0)
    marg = co.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(co * co.sum()) - np.log(np.outer(marg, marg))
    return np.where(co > 0, np.maximum(pmi, 0.0), 0.0)


def cooccurrence_embeddings(ppmi: np.ndarray, dim: int) -> np.ndarray:
    """(V, dim) word vectors from a PPMI matrix's (`ppmi_matrix`) top singular vectors, U·√S (Levy &
    Goldberg's SVD counterpart of skip-gram with a whole-row window)."""
    from sklearn.utils.extmath import randomized_svd

    u, s, _ = randomized_svd(ppmi, dim, random_state=0)
    return u * np.sqrt(s)


def ceilings(pre, tr, te, ppmi: np.ndarray, dims=(128, 512)) -> dict[str, float]:
    """Topic-probe accuracy of TF-IDF on token ids, of its LSA projections to `dims`, and of the
    mean of `dims`-wide co-occurrence word vectors (what averaged embeddings can reach once they
    encode which words share rows) — all fit on the unlabeled pretraining corpus (`ppmi` is its
    `ppmi_matrix`)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(token_pattern=r"\S+", sublinear_tf=True).fit(_docs(pre))
    x_pre, xtr, xte = (vec.transform(_docs(r)) for r in (pre, tr, te))
    ytr, yte = np.asarray(tr["label"]), np.asarray(te["label"])
    out = {"tfidf": fit_probes(xtr.toarray(), ytr, xte.toarray(), yte)["probe_accuracy"]}
    for k in dims:
        if k >= min(x_pre.shape):  # a corpus too small for this many components
            continue
        svd = TruncatedSVD(k, random_state=0).fit(x_pre)
        out[f"lsa{k}"] = fit_probes(svd.transform(xtr), ytr, svd.transform(xte), yte)["probe_accuracy"]
        emb = cooccurrence_embeddings(ppmi, k)
        out[f"cooc{k}"] = fit_probes(_bag(emb, tr), ytr, _bag(emb, te), yte)["probe_accuracy"]
    return out


def _bag(emb: np.ndarray, rows) -> np.ndarray:
    return np.stack([emb[np.asarray(ids[1:-1])].mean(0) for ids in rows["input_ids"]])


def shifted(rows, seed: int) -> dict[str, list]:
    """Word-order probe rows: each row, with probability ½, gets two adjacent (different) sub-word
    tokens swapped; label "shifted" / "original". <s> and </s> stay in place."""
    rng = np.random.default_rng(seed)
    ids_out, labels = [], []
    for ids in rows["input_ids"]:
        ids = np.array(ids)
        spots = [i for i in range(1, len(ids) - 2) if ids[i] != ids[i + 1]]
        if len(ids) < 6 or not spots:
            continue
        flip = bool(rng.random() < 0.5)
        if flip:
            i = spots[rng.integers(len(spots))]
            ids[i], ids[i + 1] = ids[i + 1], ids[i]
        ids_out.append(ids)
        labels.append("shifted" if flip else "original")
    return {"input_ids": ids_out, "label": labels}


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    return float(1 - ((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


def _group_means(y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    out = np.zeros_like(y)
    for g in np.unique(groups):
        sel = groups == g
        out[sel] = y[sel].mean(0)
    return out


@torch.no_grad()
def target_makeup(trainer: Trainer, rows, n_batches: int = 10) -> dict[str, float]:
    """R² of the teacher targets (real tokens of `n_batches` batches of 64) explained by position
    alone, by token id alone, and by the student's predictions at masked tokens (first mask)."""
    model, cfg = trainer.model, trainer.cfg
    C = cfg.model.decoder.clone_batch
    got = {}
    hook = model.decoder.register_forward_hook(lambda mod, i, o: got.__setitem__("pred", o))
    ys, pos, tok, preds, masked = [], [], [], [], []
    data = batches(rows, 64, seed=123)
    try:
        for k in range(n_batches):
            inputs, mask = collate(next(data), cfg.model, step_rng(123, 0, k), cfg.train.audio_max_samples,
                                   cfg.train.text_max_tokens, cfg.train.audio_batching)
            x, pad = model.frontend.local(inputs)
            real = ~pad if pad is not None else torch.ones_like(inputs["input_ids"], dtype=torch.bool)
            y = model.targets(inputs, x, pad)  # (B, T, D)
            model.eval()  # no dropout; the student pass is only read, not trained
            model(inputs, mask)
            ys.append(y[real].numpy())
            pos.append(torch.nonzero(real)[:, 1].numpy())
            tok.append(inputs["input_ids"][real].numpy())
            preds.append(got["pred"][::C][real].numpy())
            masked.append(mask[::C][real].numpy())
    finally:
        hook.remove()
    y, pos, tok, pred, masked = map(np.concatenate, (ys, pos, tok, preds, masked))
    return {"r2_position": _r2(y, _group_means(y, pos)), "r2_token": _r2(y, _group_means(y, tok)),
            "r2_student_masked": _r2(y[masked], pred[masked])}


def probes(model, topic, order, n_jobs: int | None = None) -> dict[str, float]:
    """Topic and word-order probes of the final layer, and the topic probe of the averaged input
    embeddings; `n_jobs` processes fit the probes' cross-validation folds."""
    out = {name: probe_accuracy(model, *rows, n_jobs=n_jobs)
           for name, rows in (("topic", topic), ("word_order", order))}
    emb = model.frontend.tokens.weight.detach().numpy()  # the student's input embeddings, averaged
    (tr, te), ytr, yte = topic, np.asarray(topic[0]["label"]), np.asarray(topic[1]["label"])
    out["topic_embedding_bag"] = fit_probes(_bag(emb, tr), ytr, _bag(emb, te), yte, n_jobs=n_jobs)["probe_accuracy"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/demo/data")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=300)
    p.add_argument("--position-init-scale", type=float, default=1.0,
                   help="multiply the learned position embeddings at init (shrinks the position share of the targets)")
    p.add_argument("--init-embeddings", choices=("random", "cooccurrence"), default="random",
                   help="cooccurrence: start the token embeddings from the corpus's PPMI-SVD word vectors "
                        "(scaled to the init's std) — does data2vec keep, improve or erode structured inputs?")
    p.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    p.add_argument("--probe-rows", type=int, default=0, help="probe on a seeded random N labeled rows per split (0 = all)")
    a = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    splits = text_splits(a.data, a.probe_rows)
    if splits is None:
        return 2
    pre, tr, te = splits
    overrides = {"train.max_steps": max(a.steps, 1), **parse_sets(a.set)}
    cfg = demo_run_config(a.data, "text", tempfile.mkdtemp(), overrides=overrides)
    topic, order = (tr, te), (shifted(tr, 0), shifted(te, 1))

    ppmi = ppmi_matrix(pre, cfg.model.frontend.vocab_size)
    ceil = ceilings(pre, tr, te, ppmi, dims=(cfg.model.encoder.dim, 4 * cfg.model.encoder.dim))
    print("topic probe without pretraining: " + ", ".join(f"{k} {v:.3f}" for k, v in ceil.items()), flush=True)
    trainer = Trainer(cfg, pre)
    with torch.no_grad():
        trainer.model.frontend.positions.weight.mul_(a.position_init_scale)
        if a.init_embeddings == "cooccurrence":
            tok = trainer.model.frontend.tokens.weight
            emb = torch.as_tensor(cooccurrence_embeddings(ppmi, tok.shape[1]), dtype=tok.dtype)
            tok.copy_(emb * (tok[2:].std() / emb[2:].std()))
            tok[trainer.model.frontend.PAD].zero_()
    curve, seconds = [], 0.0

    def record(step):
        got = probes(trainer.model, topic, order)
        if cfg.model.mode == "d2v2":  # the R² columns read the 2.0 decoder's predictions
            got.update(target_makeup(trainer, pre))
        curve.append({"step": step, "train_s": round(seconds, 1), **{k: round(v, 3) for k, v in got.items()}})
        print("  " + json.dumps(curve[-1]), flush=True)

    record(0)
    for s in range(1, a.steps + 1):
        t0 = time.perf_counter()
        trainer.train_step(*trainer.next_inputs())
        seconds += time.perf_counter() - t0
        if s % a.every == 0 or s == a.steps:
            record(s)

    print(f"\n{'step':>5} {'train_s':>8} {'topic':>6} {'topic_emb':>9} {'word_order':>10} {'R2 pos':>7} "
          f"{'R2 token':>8} {'R2 student':>10}")
    for c in curve:
        r2 = " ".join(f"{c[k]:{w}.3f}" if k in c else f"{'—':>{w}}" for k, w in
                      (("r2_position", 7), ("r2_token", 8), ("r2_student_masked", 10)))
        print(f"{c['step']:5d} {c['train_s']:8.1f} {c['topic']:6.3f} {c['topic_embedding_bag']:9.3f} "
              f"{c['word_order']:10.3f} {r2}")
    print(json.dumps({"ceilings": {k: round(v, 3) for k, v in ceil.items()}, "curve": curve,
                      "position_init_scale": a.position_init_scale, "init_embeddings": a.init_embeddings,
                      "overrides": overrides}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
