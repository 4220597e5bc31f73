import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray cluster for the session (4 logical CPUs on 2 cores is fine for tests)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="warning")
    yield ray
    ray.shutdown()
