import sys

import pytest

from pipeline.env import apply_local_ray_defaults, apply_offline_defaults

apply_offline_defaults()
apply_local_ray_defaults()  # the suite runs on one machine (the cluster suite gives its nodes their own env)

# torch only where a test module imports it: the cluster suite's own process (make test) never does,
# which keeps ~0.5 GiB out of that suite's memory budget


def pytest_collection_finish(session):
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """The embedded demo set, sharded once per session (15 train shards of <= 100 images)."""
    from pipeline.shard import ShardParams, shard_dataset

    out = tmp_path_factory.mktemp("demo_shards")
    shard_dataset("demo", str(out), ShardParams(samples_per_shard=100, processes=2), progress_bar=False)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (short temp dir: AF_UNIX path limit)."""
    import ray

    from pipeline.adapters.ray_train import ensure_ray
    from pipeline.params import RayConfig

    ensure_ray(RayConfig(temp_dir="/tmp/bireal-ray-test"))
    yield ray
    ray.shutdown()
