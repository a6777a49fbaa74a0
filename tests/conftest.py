import os
import sys
import time

import pytest

from pipeline.env import apply_local_ray_defaults, apply_offline_defaults

apply_offline_defaults()
apply_local_ray_defaults()  # the suite runs on one machine (the cluster suite gives its nodes their own env)
os.environ.pop("MLFLOW_TRACKING_URI", None)  # a developer's own server never receives the suite's runs

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


@pytest.fixture(scope="module")
def cluster(request, tmp_path_factory, pytestconfig):
    """A cluster of real services on loopback (tests/cluster_services.py) for one test module:
    S3 (moto), PostgreSQL, an MLflow server, and a Ray head with two worker nodes; the head runs
    Ray's dashboard (its job server) where the module sets ``RAY_DASHBOARD = True``."""
    from cluster_services import (
        S3,
        Cluster,
        Memory,
        MlflowServer,
        Postgres,
        RayCluster,
        enter_private_network,
        missing_privilege,
        terminal_line,
    )

    reason = missing_privilege()
    if reason:
        if os.environ.get("BIREAL_REQUIRE_CLUSTER") == "1":
            pytest.fail(f"BIREAL_REQUIRE_CLUSTER=1 but the cluster suite cannot run: {reason}")
        pytest.skip(reason)
    netns = enter_private_network()  # before any service starts: all of them, and Ray's nodes, inside
    started, memory, say = time.time(), Memory(), terminal_line(pytestconfig, "cluster")

    root = tmp_path_factory.mktemp("cluster")
    work = root / "work"  # the driver's working folder: worker nodes see a tmpfs there instead
    work.mkdir()
    services = []
    module = request.module.__name__
    try:
        s3 = S3(root)
        services.append(s3)
        pg = Postgres(root)
        services.append(pg)
        memory.markers.append(str(pg.dir))
        mlflow = MlflowServer(root, pg.uri, f"s3://{s3.bucket}/mlflow", s3.url)
        services.append(mlflow)
        ray = RayCluster(root, hidden=[work], dashboard=getattr(request.module, "RAY_DASHBOARD", False))
        services.append(ray)
        memory.markers.append(str(ray.base))
        ray.add_node(cpus=1)
        ray.add_node(cpus=1)
        yield Cluster(root, work, s3, pg, mlflow, ray, say, memory, netns)
    finally:
        for service in reversed(services):
            service.close()
        say(f"{module}: {time.time() - started:.0f} s wall, peak memory {memory.stop():.2f} GiB (PSS)")
        say(f"at the peak, GiB per program: {memory.breakdown()}")


@pytest.fixture(autouse=True)
def memory_per_test(request):
    """Each cluster test's own peak memory and its largest programs, printed after it; then the
    bucket is emptied (no test reads another's objects, and moto holds them in memory)."""
    if "cluster" not in request.fixturenames:
        yield
        return
    cluster = request.getfixturevalue("cluster")
    cluster.memory.start_test()
    yield
    peak = cluster.memory.test_peak / 2**30
    cluster.say(f"{request.node.name}: peak {peak:.2f} GiB ({cluster.memory.breakdown(5, this_test=True)})")
    cluster.s3.empty()
