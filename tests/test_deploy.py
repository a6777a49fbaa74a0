"""deploy/: the cluster files, checked with no cluster.

- every RayJob/RayCluster manifest validates against KubeRay v1.7.0's own CRD schemas
  (../shared/reference/kuberay-v1.7.0), made strict: the schemas never forbid unknown fields, so a
  misspelled one would pass; here every object schema that lists properties gets
  ``additionalProperties: false`` (a misspelled field fails, shown below), required fields that
  the operator defaults (``maxReplicas``, ...) count as optional, and apiVersion/kind are checked;
- the generated files are exactly what ``pipeline/adapters/kuberay.py`` renders (no drift);
- each RayJob's entrypoint parses with the CLI, and its params file passes check-params with
  ``ray.address`` set (every location shared storage, the recipe's batch/lr rule, shards per reader);
- the launcher YAML passes Ray's own ``prepare_config`` + ``validate_config`` (a private API of
  ray.autoscaler._private.util, pinned with ray in constraints.txt);
- one Ray version everywhere: constraints.txt, the Dockerfile's base tag, every manifest; the
  base image's CUDA is torch's.
"""

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.adapters import kuberay

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCHEMAS = ROOT.parent / "shared" / "reference" / "kuberay-v1.7.0"
PROMETHEUS_SCHEMAS = ROOT.parent / "shared" / "reference" / "prometheus-operator-v0.93.0"
MANIFESTS = sorted((DEPLOY / "kuberay").glob("ray*.yaml"))
# required by the CRD but defaulted by the operator or the API server: optional in a manifest
DEFAULTED = {"maxReplicas", "minReplicas", "replicas", "containerPort", "protocol", "rayStartParams", "groupName"}


def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields forbidden and operator-defaulted fields optional."""
    schema = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
                if not node.get("x-kubernetes-preserve-unknown-fields"):
                    node["additionalProperties"] = False
            if "required" in node:
                node["required"] = [r for r in node["required"] if r not in DEFAULTED]
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


def crd_schema(kind: str) -> dict:
    if not SCHEMAS.is_dir():
        pytest.skip(f"{SCHEMAS} is absent (the KubeRay CRDs ship beside the project, not in it)")
    crd = yaml.safe_load((SCHEMAS / f"ray.io_{kind.lower()}s.yaml").read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(v1["schema"]["openAPIV3Schema"])


def problems(manifest: dict) -> list[str]:
    import jsonschema

    kind = manifest.get("kind")
    if manifest.get("apiVersion") != "ray.io/v1" or kind not in ("RayJob", "RayCluster"):
        return [f"apiVersion/kind {manifest.get('apiVersion')}/{kind}: expected ray.io/v1 RayJob or RayCluster"]
    validator = jsonschema.Draft7Validator(crd_schema(kind))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


def test_the_manifests_are_there():
    names = {p.name for p in MANIFESTS}
    assert "raycluster.yaml" in names
    assert {f"rayjob-{kuberay.run_name(p)}.yaml" for p in kuberay.RUNS} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_kuberay_v1_7_0(path):
    manifest = yaml.safe_load(path.read_text())
    assert problems(manifest) == []


def test_strict_validation_catches_what_plain_validation_passes():
    import jsonschema

    job = yaml.safe_load((DEPLOY / "kuberay" / "rayjob-imagenet-bireal18-official.yaml").read_text())
    bad = copy.deepcopy(job)
    group = bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["numOfHost"] = 1  # misspelled numOfHosts: the operator would silently ignore it
    crd = yaml.safe_load((SCHEMAS / "ray.io_rayjobs.yaml").read_text()) if SCHEMAS.is_dir() else None
    if crd is None:
        pytest.skip(f"{SCHEMAS} is absent")
    plain = [v for v in crd["spec"]["versions"] if v["name"] == "v1"][0]["schema"]["openAPIV3Schema"]
    assert list(jsonschema.Draft7Validator(plain).iter_errors(bad)) == []  # the CRD alone lets it through
    (message,) = problems(bad)
    assert "numOfHost" in message and "workerGroupSpecs.0" in message
    bad_head = copy.deepcopy(job)
    bad_head["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"
    assert any("imagePullPolicyy" in p for p in problems(bad_head))
    assert problems({**job, "apiVersion": "ray.io/v1alpha2"})  # checked here, not by the schema
    assert problems({**job, "kind": "RayService"})


def test_the_files_are_what_the_renderer_makes():
    for path, text in kuberay.rendered().items():
        assert path.read_text() == text, f"{path} differs: run `python -m pipeline.adapters.kuberay`"


@pytest.mark.parametrize("profile", sorted(kuberay.RUNS))
def test_each_rayjob_runs_its_profile_with_cluster_params(profile, capsys):
    from pipeline.cli import build_parser, main
    from pipeline.params import load_params

    job = yaml.safe_load((DEPLOY / "kuberay" / f"rayjob-{kuberay.run_name(profile)}.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "bireal"
    args = build_parser().parse_args(argv[1:])  # parses with the CLI (argparse exits on an error)
    assert args.command == "run" and args.stage[-3:] == ["export", "evaluate", "register"]
    assert args.params.startswith(kuberay.WORKDIR + "/")  # absolute under the image's working folder
    params_file = ROOT / Path(args.params).relative_to(kuberay.WORKDIR)
    assert main(["check-params", "--params", str(params_file)]) == 0, capsys.readouterr().out
    params = load_params(params_file)
    assert params.ray.address == "auto" and params.ray.use_gpu  # so the shared-storage rule applied
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus_per_pod = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"]
    assert workers["replicas"] * gpus_per_pod == params.ray.num_workers == kuberay.run_gpus(profile)
    # the recipe itself is unchanged but for locations, workers and the linearly scaled lr
    recipe = load_params(ROOT / "pipeline" / "configs" / f"{profile}.yaml")
    for stage in ("pretrain", "binarize", "finetune"):
        a, b = recipe.train(stage, tuned=False), params.train(stage, tuned=False)
        for key in ("arch", "epochs", "phase_epochs", "batch_size", "optimizer", "activation", "weight_gradient"):
            assert getattr(a, key) == getattr(b, key), (profile, stage, key)
    env = {e["name"]: e.get("value") for e in workers["template"]["spec"]["containers"][0]["env"]}
    assert env["BIREAL_PIPELINE_RUN"] == kuberay.run_name(profile)
    assert env["MLFLOW_TRACKING_URI"] == params.mlflow.tracking_uri
    volumes = {v["name"]: v for v in workers["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"  # not the 64 MB default
    assert job["spec"]["backoffLimit"] >= 1 and "on-demand" in str(job["spec"]["rayClusterSpec"]["headGroupSpec"])


@pytest.mark.parametrize("profile", ["imagenet_bireal18_paper", "imagenet_bireal34_paper"])
def test_fidelity_runs_keep_the_published_global_and_per_gpu_batch(profile):
    """The Caffe recipes' BN saw 32 images per GPU and the solver's lr is quoted at 128: the
    cluster run is 4 x 32 at lr 0.01, not 8 x 16 (BN over 16) nor 8 x 32 at a scaled lr."""
    from pipeline.params import load_params

    params = load_params(DEPLOY / "params" / f"{profile}.yaml")
    binarize = params.train("binarize", tuned=False)
    assert (params.ray.num_workers, binarize.batch_size, binarize.lr) == (4, 32, 0.01)
    job = yaml.safe_load((DEPLOY / "kuberay" / f"rayjob-{kuberay.run_name(profile)}.yaml").read_text())
    (workers,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert (workers["replicas"], limits["nvidia.com/gpu"]) == (1, "4")  # half of an 8-GPU node
    assert int(limits["cpu"]) >= 4 * params.ray.cpus_per_worker


def test_whole_node_workers_all_reduce_over_efa():
    """A pod of a whole p5.48xlarge takes its 32 EFA interfaces and NCCL goes through libfabric's
    EFA provider; a half-node run (4 GPUs in one pod, NVLink only) asks for none."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)$", dockerfile, re.M).group(1)
    assert workdir == kuberay.WORKDIR
    assert re.search(r"^ARG EFA_INSTALLER_VERSION=\d+\.\d+\.\d+$", dockerfile, re.M)
    assert "sha256sum -c" in dockerfile and 'test -n "${EFA_INSTALLER_SHA256}"' in dockerfile
    for profile in kuberay.RUNS:
        job = yaml.safe_load((DEPLOY / "kuberay" / f"rayjob-{kuberay.run_name(profile)}.yaml").read_text())
        (workers,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        container = workers["template"]["spec"]["containers"][0]
        limits, env = container["resources"]["limits"], {e["name"]: e.get("value") for e in container["env"]}
        if limits["nvidia.com/gpu"] == "8":
            assert (
                limits["vpc.amazonaws.com/efa"] == "32" == container["resources"]["requests"]["vpc.amazonaws.com/efa"]
            )
            assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1", profile
            assert env["FI_EFA_FORK_SAFE"] == "1" and env["NCCL_SOCKET_IFNAME"] == "^lo"
        else:
            assert "vpc.amazonaws.com/efa" not in limits and "FI_PROVIDER" not in env, profile


def test_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((DEPLOY / "cluster-aws.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    workers = config["available_node_types"]["ray.worker.p5"]
    assert workers["min_workers"] == workers["max_workers"] == config["max_workers"]
    assert workers["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in config["available_node_types"]["ray.head.default"]["node_config"]
    # the p5's 32 EFA cards, checked as Ray's AWS provider checks interfaces (subnet and groups each)
    from ray.autoscaler._private.aws.config import _configure_subnets_and_groups_from_network_interfaces

    interfaces = workers["node_config"]["NetworkInterfaces"]
    assert [i["NetworkCardIndex"] for i in interfaces] == list(range(32))
    assert all(i["InterfaceType"] == "efa" for i in interfaces) and interfaces[0]["DeviceIndex"] == 0
    node = _configure_subnets_and_groups_from_network_interfaces(workers["node_config"])
    assert len(set(node["SubnetIds"])) == 1  # one subnet: EFA does not cross subnets
    assert "--device=/dev/infiniband" in config["docker"]["run_options"]
    config["available_node_types"]["ray.worker.p5"]["min_wrkers"] = 8
    with pytest.raises(Exception, match="min_wrkers"):
        validate_config(prepare_config(config))


def test_one_ray_version_and_torchs_cuda_in_the_image():
    import ray
    import torch

    pinned = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    base = re.search(r"^FROM rayproject/ray:(\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M).group(1)
    version, python, cuda = base.split("-")
    assert version == pinned == ray.__version__ == kuberay.RAY_VERSION
    assert python == "py311"
    torch_pin = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert f'"torch=={torch_pin}"' in (DEPLOY / "Dockerfile").read_text()
    assert torch.version.cuda, "these checks need the CUDA build of torch (make install)"
    assert cuda == "cu" + torch.version.cuda.replace(".", "") and f"/whl/{cuda}" in (DEPLOY / "Dockerfile").read_text()
    for path in MANIFESTS:
        spec = yaml.safe_load(path.read_text())["spec"]
        assert spec.get("rayClusterSpec", spec)["rayVersion"] == pinned, path.name


def test_tracking_server_manifest():
    """MLflow behind its basic-auth app on PostgreSQL, with nothing secret on its command line."""
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay" / "mlflow.yaml").read_text()))
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment", "Service", "Service", "StatefulSet"]
    (server,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = server["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = " ".join(container["command"] + container.get("args", []))
    assert "--app-name basic-auth" in command and "--artifacts-destination s3://" in command
    assert "postgresql://" not in command and "PASSWORD" not in command.upper()  # no secret on the command line
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "bireal-postgres"
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith("/etc/mlflow-auth/")
    assert not any(name.startswith("AWS_") for name in env) and pod["serviceAccountName"] == "bireal-mlflow"
    assert kuberay.TRACKING_URI.startswith("http://mlflow.bireal.svc")


def _ray_pods(manifest: dict) -> list[dict]:
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_ray_pods_take_a_token_a_role_and_no_keys(path):
    """Ray's token authentication on (KubeRay authOptions), S3 through the service account's role
    (IRSA), MLflow's pipeline user from a Secret; no storage keys in any pod."""
    manifest = yaml.safe_load(path.read_text())
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    assert spec["authOptions"] == {"mode": "token", "secretName": kuberay.RAY_TOKEN_SECRET}
    for pod in _ray_pods(manifest):
        assert pod["metadata"]["labels"][kuberay.RAY_POD_LABEL] == "true"  # what the NetworkPolicy admits
        assert pod["spec"]["serviceAccountName"] == kuberay.SERVICE_ACCOUNT
        for container in pod["spec"]["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert not any(n.startswith("AWS_") for n in names) and "RAY_AUTH_MODE" not in names
            assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= names
    if manifest["kind"] == "RayJob":  # its submitter is a labelled job client
        labels = manifest["spec"]["submitterPodTemplate"]["metadata"]["labels"]
        assert labels[kuberay.RAY_CLIENT_LABEL] == "true"


def test_network_policies_admit_only_labelled_clients():
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay" / "security.yaml").read_text()))
    accounts = {d["metadata"]["name"]: d["metadata"]["annotations"] for d in docs if d["kind"] == "ServiceAccount"}
    assert set(accounts) == {kuberay.SERVICE_ACCOUNT, "bireal-mlflow"}
    assert all("eks.amazonaws.com/role-arn" in annotations for annotations in accounts.values())  # IRSA
    policies = {
        d["spec"]["podSelector"]["matchLabels"].popitem(): d["spec"] for d in docs if d["kind"] == "NetworkPolicy"
    }
    assert set(policies) == {(kuberay.RAY_POD_LABEL, "true"), ("app", "bireal-mlflow"), ("app", "bireal-postgres")}

    def admitted(spec: dict) -> dict[tuple, set]:
        """(selector kind, label) -> ports ('all' where a rule names none)."""
        out = {}
        for rule in spec["ingress"]:
            ports = {p["port"] for p in rule.get("ports", [])} or {"all"}
            for peer in rule["from"]:
                ((kind, selector),) = peer.items()
                for label in selector["matchLabels"].items():
                    out.setdefault((kind, label), set()).update(ports)
        return out

    ray = admitted(policies[(kuberay.RAY_POD_LABEL, "true")])
    assert ray == {
        ("podSelector", (kuberay.RAY_POD_LABEL, "true")): {"all"},  # collectives, object managers, GCS
        ("podSelector", (kuberay.RAY_CLIENT_LABEL, "true")): {8265, 10001},  # job clients: job server, client
        ("namespaceSelector", ("bireal.io/control-plane", "true")): {8265, 8080},  # operator; Prometheus
    }
    mlflow = admitted(policies[("app", "bireal-mlflow")])
    assert mlflow[("podSelector", (kuberay.RAY_POD_LABEL, "true"))] == {5000}
    assert all(ports == {5000} for ports in mlflow.values())
    assert admitted(policies[("app", "bireal-postgres")]) == {("podSelector", ("app", "bireal-mlflow")): {5432}}
    for spec in policies.values():
        assert spec["policyTypes"] == ["Ingress"]


def test_prometheus_scrapes_every_ray_pod():
    """The PodMonitor validates strictly against prometheus-operator v0.93.0's CRD and selects the
    Ray pods, whose every container exports Ray's metrics on the named port it scrapes."""
    import jsonschema

    if not PROMETHEUS_SCHEMAS.is_dir():
        pytest.skip(f"{PROMETHEUS_SCHEMAS} is absent (the CRDs ship beside the project, not in it)")
    monitor = yaml.safe_load((DEPLOY / "kuberay" / "monitoring.yaml").read_text())
    crd = yaml.safe_load((PROMETHEUS_SCHEMAS / "monitoring.coreos.com_podmonitors.yaml").read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    validator = jsonschema.Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))
    assert [e.message for e in validator.iter_errors(monitor)] == []
    bad = copy.deepcopy(monitor)
    bad["spec"]["podMetricsEndpoints"][0]["prot"] = "metrics"  # a typo the operator would ignore
    assert any("prot" in e.message for e in validator.iter_errors(bad))
    assert monitor["spec"]["selector"]["matchLabels"] == {kuberay.RAY_POD_LABEL: "true"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for path in MANIFESTS:
        manifest = yaml.safe_load(path.read_text())
        spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert group["rayStartParams"]["metrics-export-port"] == str(kuberay.METRICS_PORT)
            for container in group["template"]["spec"]["containers"]:
                ports = {p["name"]: p["containerPort"] for p in container["ports"]}
                assert ports[endpoint["port"]] == kuberay.METRICS_PORT, path.name


def test_grafana_dashboards_are_the_ones_ray_writes(ray_local, tmp_path, capsys):
    """The ConfigMaps carry Ray's own dashboards byte for byte, taken from a running Ray's session
    folder (here the suite's local Ray), never hand-written ones."""
    from pipeline.adapters.kuberay import main

    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    dashboards = session / "metrics" / "grafana" / "dashboards"
    maps = kuberay.grafana_dashboards(dashboards)
    assert [m["metadata"]["name"] for m in maps] == ["ray-grafana-default", "ray-grafana-train"]
    for m in maps:
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1"  # Grafana's dashboard sidecar
        ((name, text),) = m["data"].items()
        assert text == (dashboards / name).read_text() and json.loads(text)["panels"]
    with pytest.raises(FileNotFoundError, match="metrics/grafana/dashboards"):
        kuberay.grafana_dashboards(tmp_path)
    main(["--grafana-from", str(dashboards)])  # what the runbook pipes into kubectl apply
    assert list(yaml.safe_load_all(capsys.readouterr().out)) == maps


def test_prefect_cluster_deployment_and_job_template_agree_with_the_cluster():
    """prefect.yaml's cluster deployment runs from the image's working folder on the params file
    and job server the DVC pipeline uses; the Kubernetes pool's template runs its Jobs as the
    cluster's job client (service account, NetworkPolicy label, Ray token) with the shared results.
    (tests/test_prefect_deploy.py creates the pool and deploys onto it on a Prefect server.)"""
    from pipeline.adapters.prefect_setup import BLOCK_SLUG

    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (cluster,) = [d for d in project["deployments"] if d["work_pool"]["name"] == "bireal-k8s"]
    run = yaml.safe_load((DEPLOY / "dvc-run.yaml").read_text())
    assert cluster["parameters"] == {"params_path": run["params"], "submit_to": run["address"]}
    assert cluster["work_pool"]["job_variables"]["image"] == kuberay.IMAGE
    assert cluster["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": kuberay.WORKDIR}}]
    assert (ROOT / cluster["parameters"]["params_path"]).is_file()

    template = json.loads((DEPLOY / "prefect" / "kubernetes-job-template.json").read_text())
    variables = template["variables"]["properties"]
    assert variables["image"]["default"] == kuberay.IMAGE and variables["namespace"]["default"] == "bireal"
    assert variables["service_account_name"]["default"] == kuberay.SERVICE_ACCOUNT
    env = variables["env"]["default"]
    assert env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] == BLOCK_SLUG and env["RAY_AUTH_MODE"] == "token"
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]
    assert pod["metadata"]["labels"] == {kuberay.RAY_CLIENT_LABEL: "true"}
    (volume,) = pod["spec"]["volumes"]
    (mount,) = pod["spec"]["containers"][0]["volumeMounts"]
    assert volume["secret"]["secretName"] == kuberay.RAY_TOKEN_SECRET and mount["name"] == volume["name"]
    assert env["RAY_AUTH_TOKEN_PATH"] == f"{mount['mountPath']}/auth_token"
