"""Frozen-encoder probes: Ray Data feature extraction (actor pool) → logistic regression + kNN.

    (xtr, ytr), (xte, yte) = extract([train_dir, test_dir], checkpoint, modality)  # (N, D) mean-pooled
    result = fit_probes(xtr, ytr, xte, yte)

Also the classical raw-input baselines (pixels / MFCC statistics / TF-IDF over token ids).
"""
from __future__ import annotations

import os

import numpy as np
import ray
import torch

from pipeline import storage
from pipeline.train.batches import eval_inputs
from pipeline.train.checkpoint import load_final

FEATURE_COLUMNS = {"image": ["image", "label"], "audio": ["audio", "label"], "text": ["input_ids", "label"]}


def read_shards(data: str, modality: str) -> "ray.data.Dataset":
    """The feature columns of a preprocessed folder (a path or URI) as a Ray dataset, one block per
    row-group chunk, read as the training stream reads them. (Not `ray.data.read_parquet`: Ray 2.60
    starts 32 footer-reading actors per read and kills them when listing ends; those still starting
    then make the GCS log "Failed to kill actor … Socket closed" — for a few footers the driver
    reads itself.)"""
    from pipeline.train.stream import chunks_dataset, list_chunks

    columns = FEATURE_COLUMNS[modality]
    return chunks_dataset(list_chunks(data, columns), columns)


def batch_features(model, batch: dict, layers: tuple[int, ...] = (-1,), audio_group: int = 16) -> np.ndarray:
    """Mean-pooled features (B, D) of a numpy batch. Audio clips go through in length-sorted
    groups of `audio_group`, so short clips are not padded to the batch's longest (the conv front
    end's cost is per padded sample)."""
    f, m = model.cfg.frontend, model.cfg.modality
    if m != "audio":
        return model.extract(eval_inputs(batch, m, f.image_size, f.max_positions), layers=layers).numpy()
    clips = batch["audio"]
    order = np.argsort([len(a) for a in clips], kind="stable")
    out = None
    for a in range(0, len(order), audio_group):
        idx = order[a: a + audio_group]
        x = model.extract(eval_inputs({"audio": [clips[i] for i in idx]}, m, f.image_size, f.max_positions),
                          layers=layers).numpy()
        out = np.empty((len(order), x.shape[1]), x.dtype) if out is None else out
        out[idx] = x
    return out


class FeatureExtractor:
    """Ray Data actor-pool UDF: loads the encoder once per actor (and, for "random", the same
    architecture at a seeded random init), batches → mean-pooled features per variant."""

    def __init__(self, checkpoint: str, variants: tuple[str, ...], layers: tuple[int, ...], teacher: bool,
                 seed: int = 0):
        torch.set_num_threads(1)
        model, config = load_final(checkpoint, teacher=teacher)
        self.models = {}
        for v in variants:
            if v == "random":  # same architecture, fresh weights: the baseline a probe must beat
                from pipeline.model.config import ModelConfig
                from pipeline.model.data2vec import Data2Vec
                torch.manual_seed(seed)
                self.models[v] = Data2Vec(ModelConfig.from_dict(config["model"])).eval()
            else:
                self.models[v] = model
        self.cfg, self.layers = model.cfg, layers

    def __call__(self, batch: dict) -> dict:
        out = {f"features_{v}": batch_features(m, batch, self.layers).astype(np.float32)
               for v, m in self.models.items()}
        return {**out, "label": batch["label"], "_src": batch["_src"]}


def extract_splits(data_dirs: list[str], checkpoint: str, modality: str, *,
                   variants: tuple[str, ...] = ("pretrained",), layers: tuple[int, ...] = (-1,),
                   teacher: bool = False, batch_size: int = 64,
                   actors: int | None = None) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Preprocessed labeled folders → per folder, per variant ("pretrained": the checkpoint;
    "random": its architecture at random init), (features (N, D), labels (N,)). One Ray Data pass
    and one actor pool serve every folder and variant."""
    import pyarrow as pa

    def tag(t: pa.Table, src: int) -> pa.Table:
        return t.append_column("_src", pa.array(np.full(t.num_rows, src, np.int32)))

    from pipeline import storage

    checkpoint = storage.canonical(checkpoint)
    parts = [read_shards(d, modality).map_batches(tag, fn_kwargs={"src": i}, batch_format="pyarrow")
             for i, d in enumerate(data_dirs)]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    # Each actor loads the model once; more actors than input files (Ray Data's read tasks) would
    # only load it and wait.
    files = sum(len(storage.shard_files(*storage.resolve(d))) for d in data_dirs)
    n = actors or max(1, min(4, int(ray.cluster_resources().get("CPU", 1)) - 1, files))
    out = ds.map_batches(FeatureExtractor, fn_constructor_kwargs=dict(
        checkpoint=checkpoint, variants=tuple(variants), layers=layers, teacher=teacher),
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=n))
    rows = [r for r in out.take_all() if r["label"] is not None]  # unlabeled files can't be probed
    result = []
    for i in range(len(data_dirs)):
        mine = [r for r in rows if r["_src"] == i]
        labels = np.asarray([r["label"] for r in mine])
        result.append({v: (np.stack([r[f"features_{v}"] for r in mine]), labels) for v in variants})
    return result


def extract_splits_in_process(data_dirs: list[str], checkpoint: str, modality: str, *,
                              variants: tuple[str, ...] = ("pretrained",), layers: tuple[int, ...] = (-1,),
                              batch_size: int = 64) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """`extract_splits` in this process, reading the shards with pyarrow: for small labeled sets on
    one machine (the demo's few thousand rows), where starting an actor pool costs more than the
    extraction itself (~30 s of the demo's ~45 s per modality on 2 cores)."""
    from pipeline.train.stream import labeled_rows

    ext = FeatureExtractor(checkpoint, tuple(variants), layers, teacher=False)
    torch.set_num_threads(os.cpu_count() or 1)  # FeatureExtractor sets 1 thread (one per actor)
    result = []
    for d in data_dirs:
        inputs, labels = labeled_rows(d, modality)
        feats = {v: [] for v in variants}
        with torch.no_grad():
            for a in range(0, len(labels), batch_size):
                b = {c: v[a: a + batch_size] for c, v in inputs.items()}
                for v, m in ext.models.items():
                    feats[v].append(batch_features(m, b, layers).astype(np.float32))
        result.append({v: (np.concatenate(f), labels) for v, f in feats.items()})
    return result


def extract(data_dirs: list[str], checkpoint: str, modality: str, *, random_init: bool = False,
            layers: tuple[int, ...] = (-1,), teacher: bool = False, batch_size: int = 64,
            actors: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Preprocessed labeled folders → per folder, (features (N, D), labels (N,)) of one encoder
    (the checkpoint, or its architecture at random init), in one actor-pool pass."""
    v = "random" if random_init else "pretrained"
    return [split[v] for split in extract_splits(data_dirs, checkpoint, modality, variants=(v,), layers=layers,
                                                 teacher=teacher, batch_size=batch_size, actors=actors)]


PROBE_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def fit_probes(xtr, ytr, xte, yte, k: int = 20, cs: tuple[float, ...] = PROBE_CS, n_jobs: int | None = None) -> dict:
    """Logistic regression on standardized features, its inverse regularization C chosen by 3-fold
    cross-validation on the training split (a fixed C over- or under-fits depending on the feature
    dimension and set size; `n_jobs` processes fit the folds); and cosine kNN (majority of k)."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = min(3, int(np.unique(ytr, return_counts=True)[1].min()))
    if len(cs) > 1 and folds >= 2:
        clf = LogisticRegressionCV(Cs=list(cs), cv=folds, max_iter=2000, scoring="accuracy", l1_ratios=(0.0,),
                                   use_legacy_attributes=False, n_jobs=n_jobs)
    else:
        clf = LogisticRegression(max_iter=2000, C=cs[-1] if len(cs) == 1 else 1.0)
    lr = make_pipeline(StandardScaler(), clf).fit(xtr, ytr)
    knn = KNeighborsClassifier(n_neighbors=min(k, len(xtr)), metric="cosine").fit(xtr, ytr)
    c = float(np.ravel(clf.C_)[0]) if hasattr(clf, "C_") else clf.C
    return {"probe_accuracy": float((lr.predict(xte) == yte).mean()),
            "knn_accuracy": float((knn.predict(xte) == yte).mean()),
            "probe_c": c, "majority_accuracy": float(np.mean(yte == _majority(ytr))),
            "n_train": int(len(ytr)), "n_test": int(len(yte)), "dim": int(xtr.shape[1]),
            "classes": int(len(set(ytr.tolist())))}


def stratified_split(y: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, held-out indices): a seeded `fraction` of every class held out (at least one
    row of each class with two or more rows; singletons stay in the fit)."""
    rng = np.random.default_rng([seed, 7877])
    fit, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        held += idx[:n].tolist()
        fit += idx[n:].tolist()
    return np.sort(fit), np.sort(held)


def _majority(y):
    vals, counts = np.unique(y, return_counts=True)
    return vals[counts.argmax()]


def classical_features(data_dir: str, modality: str):
    """Raw-input features for the classical baseline: pixels; MFCC mean+std; token-id TF-IDF rows."""
    rows = [r for r in read_shards(data_dir, modality).take_all() if r["label"] is not None]
    labels = np.asarray([r["label"] for r in rows])
    if modality == "image":
        from pipeline.augment import eval_views  # the pixels of the view the encoders see
        size = int(storage.read_json(storage.join(data_dir, "manifest.json"))["settings"]["size"])
        return eval_views([r["image"] for r in rows], size).reshape(len(rows), -1).astype(np.float32) / 255, labels
    if modality == "audio":
        import torchaudio
        mfcc = torchaudio.transforms.MFCC(sample_rate=16000, n_mfcc=20,
                                          melkwargs={"n_fft": 400, "hop_length": 160, "n_mels": 40})
        feats = []
        for r in rows:
            m = mfcc(torch.as_tensor(np.asarray(r["audio"], np.float32)))  # (20, frames)
            feats.append(torch.cat([m.mean(1), m.std(1)]).numpy())
        return np.stack(feats), labels
    return [" ".join(map(str, r["input_ids"][1:-1])) for r in rows], labels


def classical_probe(train_dir: str, test_dir: str, modality: str, n_jobs: int | None = None) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer

    xtr, ytr = classical_features(train_dir, modality)
    xte, yte = classical_features(test_dir, modality)
    if modality == "text":
        vec = TfidfVectorizer(token_pattern=r"\S+", ngram_range=(1, 2), min_df=2, sublinear_tf=True)
        xtr, xte = vec.fit_transform(xtr), vec.transform(xte)
        from sklearn.linear_model import LogisticRegression
        clf = LogisticRegression(max_iter=2000, C=10.0).fit(xtr, ytr)
        return {"probe_accuracy": float((clf.predict(xte) == yte).mean()), "n_train": len(ytr), "n_test": len(yte)}
    if modality == "image" and _grey(xtr) and _grey(xte):  # grey images stored as RGB (HWC): one channel
        xtr, xte = xtr[:, ::3], xte[:, ::3]                # holds all there is, at a third of the cost
    return fit_probes(xtr, ytr, xte, yte, n_jobs=n_jobs)


def _grey(x: np.ndarray) -> bool:
    rgb = x.reshape(len(x), -1, 3)
    return bool((rgb == rgb[:, :, :1]).all())
