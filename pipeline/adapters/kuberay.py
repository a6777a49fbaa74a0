"""The cluster files of a reproduction run, rendered from its recipe profile: ``deploy/`` holds the
output, and ``tests/test_deploy.py`` checks that it is what this renders (no hand-edited drift).

For each profile and GPU count:
- ``deploy/params/<profile>.yaml``: the recipe profile with the cluster's locations (shards,
  checkpoints, Ray and Tune storage, MLflow artifacts in the object store; the tracking server;
  ``ray.address: auto``, the RayJob's own cluster), ``ray.num_workers`` = the GPUs, and the recipe's
  lr scaled to that global batch as the recipe allows;
- ``deploy/kuberay/rayjob-<profile>.yaml``: a RayJob whose entrypoint runs the profile's stages
  with that params file on a cluster of 8-GPU worker pods (min = max replicas; /dev/shm sized for
  the DataLoader workers; local NVMe for the shard cache; a head on on-demand capacity; the
  tracking URI and the pipeline run id as env; ``backoffLimit`` retries that resume, since run
  names are stable);
- ``deploy/kuberay/raycluster.yaml``: the same cluster for interactive use.
- ``deploy/kuberay/monitoring.yaml``: the PodMonitor that scrapes every Ray pod's metrics port.
Usage: python -m pipeline.adapters.kuberay   (rewrites deploy/params and deploy/kuberay);
       python -m pipeline.adapters.kuberay --grafana-from DIR   (Ray's Grafana dashboards as ConfigMaps)
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import yaml

from ..params import CONFIGS_DIR, STAGES, Params, load_params
from ..profile_rules import expected_lr, trained_stages

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RAY_VERSION = "2.60.0"  # = constraints.txt's ray pin, the Dockerfile's base tag (tests/test_deploy.py)
IMAGE = "ghcr.io/bireal/bireal:0.1.0"  # built from deploy/Dockerfile and pushed by the runbook
BUCKET = "s3://bireal-imagenet"  # shards and run outputs (docs/reproduction.md: create it first)
TRACKING_URI = "http://mlflow.bireal.svc.cluster.local:5000"  # deploy/kuberay/mlflow.yaml
GPUS_PER_NODE = 8
# security (deploy/kuberay/security.yaml): the Secrets and the service account the runbook creates
RAY_TOKEN_SECRET = "bireal-ray-token"  # key auth_token: Ray's token (KubeRay authOptions)
MLFLOW_AUTH_SECRET = "bireal-mlflow-auth"  # the pipeline's MLflow user (basic-auth app)
SERVICE_ACCOUNT = "bireal-runner"  # IRSA: annotated with the IAM role that reaches the bucket
RAY_POD_LABEL = "bireal.io/ray"  # the NetworkPolicies admit Ray pods by this label
METRICS_PORT = 8080  # Ray's Prometheus metrics on every pod (rayStartParams metrics-export-port)
GRAFANA_DASHBOARDS = ("default", "train")  # Ray's own dashboards of what this pipeline runs: cluster, Train
RAY_CLIENT_LABEL = "bireal.io/ray-client"  # ... and job clients (the submitter, a runbook's pod) by this
CPUS_PER_NODE = 192  # an 8 x H100 node (p5.48xlarge): 24 per GPU, some left to Ray and the kubelet
SHM_GI = 64  # DataLoader workers pass batches through /dev/shm: the pod default of 64 MB crashes them
NVME = "/mnt/nvme"  # the node's local NVMe (instance store), for the shard cache
WORKDIR = "/home/ray/bireal"  # the image's working folder (deploy/Dockerfile's WORKDIR)
# EFA, the p5.48xlarge's 32 network cards, as the EFA device plugin advertises them; a run across
# nodes all-reduces through them (NCCL's aws-ofi-nccl plugin, in the image) instead of TCP sockets
EFA_RESOURCE = "vpc.amazonaws.com/efa"
EFA_PER_NODE = 32
NCCL_EFA_ENV = {
    "FI_PROVIDER": "efa",  # libfabric: the EFA provider, no fallback to TCP
    "FI_EFA_USE_DEVICE_RDMA": "1",  # GPUDirect RDMA on p5
    "FI_EFA_FORK_SAFE": "1",  # DataLoader workers fork after libfabric is loaded
    "NCCL_SOCKET_IFNAME": "^lo",  # NCCL's bootstrap over the pod's network, never loopback
    "NCCL_DEBUG": "INFO",  # the log says which transport NCCL chose ("NET/OFI Selected Provider is efa")
    "NCCL_DEBUG_SUBSYS": "INIT,NET",
}

# profile -> GPUs of its reproduction run. None: the profile's own ray.num_workers, for the fidelity
# profiles whose per-GPU batch is part of the recipe: the Caffe runs normalised BN over 32 images
# per GPU, so 8 x 16 (same global batch) or 8 x 32 (another batch) would each change the recipe.
RUNS = {
    "imagenet_bireal18_official": 8,
    "imagenet_bireal18_paper": None,
    "imagenet_bireal34_paper": None,
    "imagenet_bireal50_official": 8,
    "imagenet_bireal152": 64,
}
AFTER_TRAINING = ("export", "evaluate", "register")


def run_gpus(profile: str) -> int:
    """The GPUs (data-parallel workers) of the profile's reproduction run (``RUNS``)."""
    return RUNS[profile] or load_params(CONFIGS_DIR / f"{profile}.yaml").ray.num_workers


def run_name(profile: str) -> str:
    """The pipeline run id (MLflow group, Ray run names, storage prefix): stable across retries."""
    return profile.replace("_", "-")


def cluster_params(profile: str, gpus: int) -> dict:
    """The recipe profile's values with the cluster's locations, workers and scaled lr."""
    params = load_params(CONFIGS_DIR / f"{profile}.yaml")
    raw = copy.deepcopy(params.raw)
    run = f"{BUCKET}/runs/{run_name(profile)}"
    raw.setdefault("train", {}).update({"shards": f"{BUCKET}/shards", "out": "/tmp/bireal/checkpoints"})
    for stage in (s for s in STAGES if s in params.recipe.batch):
        raw.setdefault(stage, {})["lr"] = round(expected_lr(params, stage, gpus), 10)
    raw["ray"] = {
        **(raw.get("ray") or {}),
        "address": "auto",  # the RayJob's cluster: the entrypoint runs on its head
        "num_workers": gpus,
        "use_gpu": True,
        "cpus_per_worker": CPUS_PER_NODE // GPUS_PER_NODE - 2,
        "storage_path": f"{run}/ray",
    }
    raw["storage"] = {"artifacts": f"{run}/artifacts", "shard_cache": f"{NVME}/bireal-shards"}
    raw["tune"] = {**(raw.get("tune") or {}), "storage_path": f"{run}/tune"}
    raw["mlflow"] = {
        "tracking_uri": TRACKING_URI,
        "experiment": f"bireal-{run_name(profile)}",
        "artifact_location": f"{BUCKET}/mlflow",
    }
    return raw


def entrypoint(profile: str, params: Params) -> str:
    """The profile's stages in pipeline order: pretrain when it trains a twin; tune (disabled, it
    writes the empty pick binarize reads); binarize; finetune (with 0 epochs it still writes the
    constrained, alpha-folded checkpoint that export packs); then export, evaluate and register."""
    twin = ["pretrain"] if "pretrain" in trained_stages(params) else []
    order = twin + ["tune", "binarize", "finetune"]
    # absolute: the driver's working folder is the job's, not necessarily the image's
    return f"bireal run {' '.join(order + list(AFTER_TRAINING))} --params {WORKDIR}/deploy/params/{profile}.yaml"


def env(profile: str) -> list[dict]:
    """Every Ray pod's environment. No storage keys: S3 through the service account's IAM role
    (IRSA); MLflow's pipeline user from a Secret; the Ray token is KubeRay's (``authOptions``)."""

    def secret(name: str, key: str) -> dict:
        return {"secretKeyRef": {"name": name, "key": key}}

    return [
        {"name": "BIREAL_PIPELINE_RUN", "value": run_name(profile)},
        {"name": "MLFLOW_TRACKING_URI", "value": TRACKING_URI},
        {"name": "MLFLOW_TRACKING_USERNAME", "valueFrom": secret(MLFLOW_AUTH_SECRET, "pipeline-username")},
        {"name": "MLFLOW_TRACKING_PASSWORD", "valueFrom": secret(MLFLOW_AUTH_SECRET, "pipeline-password")},
    ]


def pod_metadata() -> dict:
    """The label the NetworkPolicies admit (deploy/kuberay/security.yaml): a Ray pod of bireal's."""
    return {"labels": {RAY_POD_LABEL: "true"}}


def head_group(profile: str) -> dict:
    return {
        # no training on the head; Prometheus metrics on METRICS_PORT (the PodMonitor scrapes it)
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0", "metrics-export-port": str(METRICS_PORT)},
        "template": {
            "metadata": pod_metadata(),
            "spec": {
                "serviceAccountName": SERVICE_ACCOUNT,
                # the head holds the GCS and the job driver: never on spot capacity
                "nodeSelector": {"karpenter.sh/capacity-type": "on-demand"},
                "containers": [
                    {
                        "name": "ray-head",
                        "image": IMAGE,
                        "env": env(profile),
                        "ports": [
                            {"containerPort": 6379, "name": "gcs"},
                            {"containerPort": 8265, "name": "dashboard"},
                            {"containerPort": 10001, "name": "client"},
                            {"containerPort": METRICS_PORT, "name": "metrics"},
                        ],
                        "resources": {
                            "requests": {"cpu": "8", "memory": "32Gi"},
                            "limits": {"cpu": "8", "memory": "32Gi"},
                        },
                    }
                ],
            },
        },
    }


def worker_group(profile: str, gpus: int) -> dict:
    """``gpus`` GPUs in pods of up to 8 (one per node); a run of fewer takes that share of a node.
    A whole-node pod also takes the node's 32 EFA interfaces, with NCCL set to use them."""
    nodes = math.ceil(gpus / GPUS_PER_NODE)
    per_node = min(gpus, GPUS_PER_NODE)
    per_pod = {
        "cpu": str(CPUS_PER_NODE * per_node // GPUS_PER_NODE - 8),
        "memory": f"{1800 * per_node // GPUS_PER_NODE}Gi",
        "nvidia.com/gpu": str(per_node),
    }
    worker_env = env(profile)
    if per_node == GPUS_PER_NODE:
        per_pod[EFA_RESOURCE] = str(EFA_PER_NODE)
        worker_env += [{"name": k, "value": v} for k, v in NCCL_EFA_ENV.items()]
    return {
        "groupName": f"gpu-{per_node}x",
        "replicas": nodes,
        "minReplicas": nodes,  # min = max: a data-parallel job needs all of its workers
        "maxReplicas": nodes,
        "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
        "template": {
            "metadata": pod_metadata(),
            "spec": {
                "serviceAccountName": SERVICE_ACCOUNT,
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "containers": [
                    {
                        "name": "ray-worker",
                        "image": IMAGE,
                        "env": worker_env,
                        "ports": [{"containerPort": METRICS_PORT, "name": "metrics"}],
                        "resources": {"requests": per_pod, "limits": per_pod},
                        "volumeMounts": [
                            {"name": "dshm", "mountPath": "/dev/shm"},
                            {"name": "nvme", "mountPath": NVME},
                        ],
                    }
                ],
                "volumes": [
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{SHM_GI}Gi"}},
                    {"name": "nvme", "hostPath": {"path": NVME, "type": "DirectoryOrCreate"}},
                ],
            },
        },
    }


def cluster_spec(profile: str, gpus: int) -> dict:
    return {
        "rayVersion": RAY_VERSION,
        # Ray's token authentication: KubeRay gives every Ray pod RAY_AUTH_MODE=token and the token
        # from this Secret; a job client without it gets 401 (docs/cluster.md, security)
        "authOptions": {"mode": "token", "secretName": RAY_TOKEN_SECRET},
        "headGroupSpec": head_group(profile),
        "workerGroupSpecs": [worker_group(profile, gpus)],
    }


def rayjob(profile: str, gpus: int) -> dict:
    params = load_params(CONFIGS_DIR / f"{profile}.yaml")
    name = f"bireal-{run_name(profile)}"
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "namespace": "bireal",
            # Kueue admits the whole job (head + every worker) at once: gang scheduling
            "labels": {"kueue.x-k8s.io/queue-name": "bireal-gpu", "app.kubernetes.io/part-of": "bireal"},
        },
        "spec": {
            "entrypoint": entrypoint(profile, params),
            "submissionMode": "K8sJobMode",
            # the submitter pod (KubeRay fills in `ray job submit` and the token): labelled as a job
            # client, the one kind of pod besides Ray's own that the head admits
            "submitterPodTemplate": {
                "metadata": {"labels": {RAY_CLIENT_LABEL: "true"}},
                "spec": {"restartPolicy": "Never", "containers": [{"name": "ray-job-submitter", "image": IMAGE}]},
            },
            # a retried job finds its stage runs by their stable names and resumes from storage
            "backoffLimit": 3,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "rayClusterSpec": cluster_spec(profile, gpus),
        },
    }


def raycluster(profile: str = "imagenet_bireal18_official", gpus: int = 8) -> dict:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {
            "name": "bireal-interactive",
            "namespace": "bireal",
            "labels": {"app.kubernetes.io/part-of": "bireal"},
        },
        "spec": cluster_spec(profile, gpus),
    }


def pod_monitor() -> dict:
    """Prometheus (prometheus-operator) scrapes every Ray pod's metrics port, labelled with its
    RayCluster as Ray's Grafana dashboards expect (``ray_io_cluster``)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": "bireal-ray", "namespace": "bireal", "labels": {"app.kubernetes.io/part-of": "bireal"}},
        "spec": {
            "selector": {"matchLabels": {RAY_POD_LABEL: "true"}},
            "namespaceSelector": {"matchNames": ["bireal"]},
            "podMetricsEndpoints": [
                {
                    "port": "metrics",
                    "interval": "15s",
                    "relabelings": [
                        {
                            "action": "replace",
                            "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
                            "targetLabel": "ray_io_cluster",
                        }
                    ],
                }
            ],
        },
    }


def grafana_dashboards(dashboards_dir: Path) -> list[dict]:
    """Ray's own Grafana dashboards, as written by the running Ray version into its session folder
    (``<session>/metrics/grafana/dashboards``), one ConfigMap each for Grafana's dashboard sidecar
    (label ``grafana_dashboard: "1"``). Not hand-written: take them from the cluster's head, whose
    Ray matches the metrics it exports (docs/cluster.md, "Metrics")."""
    maps = []
    for name in GRAFANA_DASHBOARDS:
        path = dashboards_dir / f"{name}_grafana_dashboard.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not there; pass Ray's <session>/metrics/grafana/dashboards folder")
        maps.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": f"ray-grafana-{name}",
                    "namespace": "bireal",
                    "labels": {"grafana_dashboard": "1", "app.kubernetes.io/part-of": "bireal"},
                },
                "data": {path.name: path.read_text()},
            }
        )
    return maps


HEADER = "# Generated by `python -m pipeline.adapters.kuberay` from {source}: edit that, then re-render.\n"


def rendered() -> dict[Path, str]:
    """Every generated deploy file -> its text."""
    out = {}
    for profile in RUNS:
        gpus = run_gpus(profile)
        source = f"pipeline/configs/{profile}.yaml"
        out[DEPLOY / "params" / f"{profile}.yaml"] = HEADER.format(source=source) + yaml.safe_dump(
            cluster_params(profile, gpus), sort_keys=False
        )
        out[DEPLOY / "kuberay" / f"rayjob-{run_name(profile)}.yaml"] = HEADER.format(
            source=f"{source} ({gpus} GPUs)"
        ) + yaml.safe_dump(rayjob(profile, gpus), sort_keys=False)
    out[DEPLOY / "kuberay" / "raycluster.yaml"] = HEADER.format(source="pipeline/adapters/kuberay.py") + yaml.safe_dump(
        raycluster(), sort_keys=False
    )
    out[DEPLOY / "kuberay" / "monitoring.yaml"] = HEADER.format(source="pipeline/adapters/kuberay.py") + yaml.safe_dump(
        pod_monitor(), sort_keys=False
    )
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m pipeline.adapters.kuberay", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--grafana-from",
        metavar="DIR",
        help="print ConfigMaps of Ray's Grafana dashboards from DIR (<session>/metrics/grafana/dashboards) instead",
    )
    args = parser.parse_args(argv)
    if args.grafana_from:
        sys.stdout.write(yaml.safe_dump_all(grafana_dashboards(Path(args.grafana_from)), sort_keys=False))
        return
    for path, text in rendered().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
