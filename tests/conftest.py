import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
# Ray Train's controller polls its workers every 2 s by default: a test run of a few steps waits
# that long to be seen started and again to be seen done (a 4-step run on 2 workers measured 19.0 s
# → 16.8 s at 0.2 s). The clusters the tests start, and the job commands they run, inherit this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# As the jobs set it for a local cluster they start (pipeline/raycluster.init_ray): no node here can
# be preempted, so no run needs Ray Train's preemption watcher, an actor process per run.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the session (6 logical CPUs on 2 cores: logical oversubscription is fine for tests)."""
    import ray

    from tests.servers import SESSION_RAY

    ray.init(**SESSION_RAY)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory):
    """Real demo files (a subset: 600 MNIST digits, one clip per voice and digit, all fortunes)."""
    from jobs.prepare_demo import main
    out = str(tmp_path_factory.mktemp("demo_raw"))
    assert main(["--output", out, "--image-limit", "600", "--audio-repeats", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def demo_shards(ray_local, demo_raw, tmp_path_factory):
    """The demo data preprocessed by the real pipeline: {"image": pretraining dir, ...,
    "image_train"/"image_test": labeled probe splits, ...}."""
    from pipeline.config import AudioSettings, ImageSettings, PreprocessConfig, TextSettings
    from pipeline.ingest import run
    root = tmp_path_factory.mktemp("demo_shards")
    out = {}
    settings = {"image": dict(image=ImageSettings(size=28)), "audio": dict(audio=AudioSettings(crop_seconds=2.0)),
                "text": dict(text=TextSettings(max_length=64, vocab_size=2000))}
    for mod, pre in (("image", "train"), ("audio", "train"), ("text", "pretrain")):
        for split in dict.fromkeys((pre, "train", "test")):
            d = str(root / f"{mod}_{split}")
            tok = os.path.join(out[mod], "tokenizer.json") if mod == "text" and split != pre else None
            run(PreprocessConfig(modality=mod, input=os.path.join(demo_raw, mod, split), output=d,
                                 tokenizer=tok, **settings[mod]))
            out[f"{mod}_{split}"] = d
            if split == pre:
                out[mod] = d
    return out


@pytest.fixture(scope="session")
def image_encoder(demo_shards, tmp_path_factory):
    """A data2vec 2.0 image run of 120 steps on the demo digits, 1 worker → its folder (final/,
    mlflow.db): enough pretraining to lift the linear probe over random init (the quality bar),
    and the pretrained encoder the tests that fine-tune or benchmark from one share. Its folder
    has a space, named as a file:// URI (`…/image%20encoder/run`) as a user may: the run must land in
    the one folder every later job looks in."""
    import pathlib

    from jobs.pretrain import main
    out = str(tmp_path_factory.mktemp("runs") / "image encoder" / "run")
    assert main(["--modality", "image", "--data", demo_shards["image"], "--output", pathlib.Path(out).as_uri(),
                 "--max-steps", "120", "--num-workers", "1", "--set", "train.log_every=20"]) == 0
    return out

