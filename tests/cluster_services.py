"""Real services for the cluster suite, all on loopback, each a process of its own, all in a
network namespace of their own (``enter_private_network``: Ray's nodes bind every interface, and
here the only one is a private loopback, so nothing of the suite is reachable from the host).

- ``S3``: moto's server (``moto_server``), a process so that a test can SIGSTOP it.
- ``Postgres``: initdb in a temp folder owned by the postgres user (it refuses to run as root),
  ``pg_ctl`` on a free port, fsync off.
- ``MlflowServer``: ``mlflow server`` with the PostgreSQL backend store and S3 artifacts.
- ``RayCluster``: the head in this mount namespace with 0 CPUs (so no training worker lands on the
  driver's node); each worker node in its own mount namespace (``unshare -m``) with tmpfs over its
  Ray temp folder and over the driver's work folder, at its own loopback address 127.0.0.N (Ray
  Train groups workers into nodes by IP). A node is killed through its own processes, found by
  their mount namespace; never with ``ray stop``, which stops every Ray process on the host.
  With ``dashboard=True`` the head also runs Ray's dashboard, whose job server ``bireal submit``,
  ``dvc repro deploy/dvc.yaml`` and the Prefect flow submit to (tests/test_cluster_submit.py).
- ``Memory``: the suite's peak memory against its budget (docs/cluster.md).
- ``Cluster``: the running services and the helpers the tests share (params files, the CLI as the
  driver, what MLflow and Ray Train recorded). The ``cluster`` fixture (tests/conftest.py) makes one
  per test module.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.3)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not up after {timeout:.0f} s\n{tail}")


# A command that stops printing for this long is stuck; a slow one (a loaded machine) is not.
STALLED_AFTER_S = 600.0


def wait_progressing(proc: subprocess.Popen, logs: list[Path], what: str, stalled_after=STALLED_AFTER_S) -> int:
    """``proc``'s exit status. It may take as long as it keeps writing to ``logs``; once they have
    not grown for ``stalled_after`` seconds its session is killed and the test fails with their
    tails. (A wall-clock limit would fail a test on a busy machine that a quiet one passes.)"""
    sizes, moved = None, time.monotonic()
    while proc.poll() is None:
        now = [log.stat().st_size if log.exists() else 0 for log in logs]
        if now != sizes:
            sizes, moved = now, time.monotonic()
        elif time.monotonic() - moved > stalled_after:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            tails = "\n".join(log.read_text(errors="replace")[-3000:] for log in logs if log.exists())
            pytest.fail(f"{what}: no output for {stalled_after:.0f} s, killed\n{tails}")
        time.sleep(1.0)
    return proc.returncode


def run_watched(
    cmd: list[str], what: str = "", watch: tuple[Path, ...] = (), stalled_after: float = STALLED_AFTER_S, **popen
) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` bounded by progress, not by a clock:
    the command is killed only after it, and the logs in ``watch`` (of the processes doing its
    work, such as a worker's), have had nothing new for ``stalled_after`` seconds."""
    with tempfile.TemporaryDirectory(prefix="watched-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        with out.open("w") as stdout, err.open("w") as stderr:
            proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, start_new_session=True, **popen)
            code = wait_progressing(proc, [out, err, *watch], what or " ".join(map(str, cmd)), stalled_after)
        return subprocess.CompletedProcess(cmd, code, out.read_text(), err.read_text())


def terminal_line(pytestconfig, tag: str):
    """``say(line)``: writes ``[tag] line`` to pytest's terminal even while output is captured (a
    module's figures: wall time, peak memory, what a user of the tool would read)."""
    reporter = pytestconfig.pluginmanager.getplugin("terminalreporter")
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def say(line: str) -> None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"[{tag}] {line}")

    return say


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def stop(proc: subprocess.Popen | None, sig=signal.SIGTERM, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGCONT)  # a test may have stopped it
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class S3:
    # moto accepts any credentials; every process of the suite (and its children) gets these
    CREDENTIALS = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }

    def __init__(self, root: Path, bucket: str = "bireal"):
        os.environ.update(self.CREDENTIALS)
        self.port, self.bucket = free_port(), bucket
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "moto.log"
        self.proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(lambda: port_open(self.port), 30, "moto_server", self.log)
        self.client().create_bucket(Bucket=bucket)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def empty(self) -> int:
        """Delete every object (moto keeps them in its own memory); -> how many there were."""
        keys, client = self.keys(), self.client()
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})
        return len(keys)

    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None where there is none."""
        client = self.client()
        try:
            return client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None

    def close(self) -> None:
        stop(self.proc)


class Postgres:
    def __init__(self, root: Path):
        if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
            raise RuntimeError("PostgreSQL's initdb/pg_ctl are not on PATH")
        self.dir = Path(tempfile.mkdtemp(prefix="bireal-pg-"))  # short: its socket lives here
        self.port = free_port()
        run_as = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]
        if run_as:
            shutil.chown(self.dir, "postgres", "postgres")
        self.log = root / "postgres.log"
        data = self.dir / "data"
        subprocess.run(
            [*run_as, "initdb", "--auth=trust", "-U", "postgres", "-D", str(data)], check=True, capture_output=True
        )
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off -k {self.dir}"
        subprocess.run(
            [*run_as, "pg_ctl", "-D", str(data), "-o", options, "-l", str(self.dir / "server.log"), "-w", "start"],
            check=True,
            capture_output=True,
        )
        self._run_as, self._data = run_as, data
        self.uri = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def close(self) -> None:
        subprocess.run([*self._run_as, "pg_ctl", "-D", str(self._data), "-m", "immediate", "stop"], capture_output=True)
        log = self.dir / "server.log"
        if log.exists():
            shutil.copyfile(log, self.log)
        shutil.rmtree(self.dir, ignore_errors=True)


class MlflowServer:
    def __init__(
        self, root: Path, backend: str, artifacts: str, s3_endpoint: str, app: str = "", env: dict | None = None
    ):
        """``app``: MLflow's ``--app-name`` (``basic-auth``), with its settings in ``env``."""
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "mlflow-server.log"
        # no server-side job runners (7 huey consumers, ~1.2 GB): the pipeline submits no server jobs
        env = {
            **os.environ,
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--workers",
                "1",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                backend,
                "--artifacts-destination",
                artifacts,
                *(["--app-name", app] if app else []),
            ],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            start_new_session=True,
        )
        wait_for(lambda: _http_ok(f"{self.uri}/health"), 120, "mlflow server", self.log)

    def close(self) -> None:
        stop(self.proc)


def _http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as r:
        return r.status == 200


# The cluster runs with Ray's token authentication on, as deploy/ does: every process of it (head,
# nodes, `bireal` commands, the flow) gets this session's token; a request without it gets 401.
RAY_TOKEN = secrets.token_hex(16)


def ray_headers() -> dict[str, str]:
    """What a client sends the cluster's dashboard (job server): the token as a Bearer header."""
    return {"Authorization": f"Bearer {RAY_TOKEN}"}


def cluster_env() -> dict[str, str]:
    """The environment for cluster processes: without the single-machine loopback settings
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes `ray start --address` abort), with the token."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env["GLOO_SOCKET_IFNAME"] = "lo"  # every node is on loopback here
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN})
    return env


# On SIGTERM `ray start --block` drains its node for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s;
# for Serve replicas, which no test runs), and stop() would wait out 20 s of it before its SIGKILL
# (20 s of each services module's teardown); <= 0 stops at once.
NO_DRAIN = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


class TokenRayHead:
    """A lone Ray head (no worker nodes) with token authentication on and its dashboard, the job
    server, on 127.0.0.1; every process started from it inherits this environment."""

    def __init__(self, root: Path, token: str, cpus: int = 1):
        self.token, self.temp = token, Path(tempfile.mkdtemp(prefix="brt-", dir="/tmp"))  # short: AF_UNIX paths
        port, dashboard = free_port(), free_port()
        log = root / "ray-head.log"
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1"]
            + ["--num-cpus", str(cpus), "--temp-dir", str(self.temp), "--include-dashboard", "true"]
            + ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard)]
            + ["--dashboard-agent-listen-port", "0", "--object-store-memory", "100000000", "--disable-usage-stats"],
            env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, **NO_DRAIN},
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{dashboard}"
        wait_for(lambda: _http_ok(f"{self.url}/api/jobs/", self.headers), 120, "Ray's job server", log)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def close(self) -> None:
        stop(self.proc)
        subprocess.run(["pkill", "-f", str(self.temp)], check=False)  # any Ray process left of this head


class RayCluster:
    """A head (0 CPUs) and worker nodes, each worker node in its own mount namespace."""

    def __init__(self, root: Path, hidden: list[Path], dashboard: bool = False):
        self.root, self.hidden = root, hidden
        self.base = Path(tempfile.mkdtemp(prefix="brc-", dir="/tmp"))  # short: AF_UNIX paths
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self._next_ip = 2
        # the dashboard (~0.35 GiB) hosts the job server; only the submit suite needs one
        self.dashboard = f"http://127.0.0.1:{free_port()}" if dashboard else ""
        web = (
            ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1"]
            + ["--dashboard-port", self.dashboard.rsplit(":", 1)[1]]
            if dashboard
            else ["--include-dashboard", "false"]
        )
        head = subprocess.run(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--num-cpus",
                "0",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--temp-dir",
                str(self.base / "head"),
                *web,
                "--dashboard-agent-listen-port",
                "0",
                "--object-store-memory",
                "100000000",
                "--disable-usage-stats",
            ],
            env=cluster_env(),
            capture_output=True,
            text=True,
        )
        if head.returncode != 0:
            raise RuntimeError(f"ray start --head failed:\n{head.stdout[-2000:]}\n{head.stderr[-2000:]}")
        if dashboard:  # the job server answers once the dashboard's job module is up
            jobs = f"{self.dashboard}/api/jobs/"
            wait_for(lambda: _http_ok(jobs, ray_headers()), 90, "the Ray dashboard's job server")

    def add_node(self, cpus: int = 1, gpus: int = 0) -> str:
        """Start a worker node in a new mount namespace; -> its IP."""
        ip = f"127.0.0.{self._next_ip}"
        self._next_ip += 1
        temp = self.base / ip.rsplit(".", 1)[1]
        temp.mkdir()
        mounts = " && ".join(f"mount -t tmpfs tmpfs {p}" for p in [temp, *self.hidden])
        # No --block: the ray CLI (~80 MB) exits once the node runs, and `sleep` stays as the
        # namespace's process for Popen (killed with the node). No log monitor: Ray wants one per
        # physical host, and the head's is this host's.
        start = (
            f"{BIN / 'ray'} start --address {self.address} --node-ip-address {ip} --num-cpus {cpus} "
            f"--num-gpus {gpus} --temp-dir {temp} --dashboard-agent-listen-port 0 --include-log-monitor false "
            f"--object-store-memory 100000000 --disable-usage-stats && exec sleep infinity"
        )
        log = self.root / f"node-{ip}.log"
        self.nodes[ip] = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mounts} && {start}"],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=cluster_env(),
            start_new_session=True,
        )
        wait_for(lambda: ip in self.alive_ips(), 90, f"ray node {ip}", log)
        return ip

    def alive_ips(self) -> set[str]:
        out = subprocess.run(
            [
                str(BIN / "python"),
                "-c",
                "import ray, json; ray.init(address='%s', log_to_driver=False);"
                "print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))" % self.address,
            ],
            env=cluster_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        return set(json.loads(out.stdout.strip().splitlines()[-1])) if out.returncode == 0 else set()

    def node_pids(self, ip: str) -> list[int]:
        """Every process in the node's mount namespace (its raylet, workers, their children)."""
        proc = self.nodes[ip]
        ns = os.readlink(f"/proc/{proc.pid}/ns/mnt")
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "ns" / "mnt") == ns:
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    def processes(self, comm_prefix: str) -> list[int]:
        """PIDs on the live worker nodes whose program name starts with ``comm_prefix``
        (Ray names its actors' processes ``ray::<Class>``, cut to 15 characters)."""
        found = []
        for ip, proc in self.nodes.items():
            if proc.poll() is None:
                for pid in self.node_pids(ip):
                    try:
                        if Path(f"/proc/{pid}/comm").read_text().startswith(comm_prefix):
                            found.append(pid)
                    except OSError:
                        pass
        return found

    def kill_node(self, ip: str) -> None:
        for pid in self.node_pids(ip):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes[ip].wait(timeout=30)

    def close(self) -> None:
        for ip in list(self.nodes):
            if self.nodes[ip].poll() is None:
                self.kill_node(ip)
        # the head's processes name its temp folder; `ray stop` would stop every Ray on the host
        subprocess.run(["pkill", "-9", "-f", str(self.base / "head")], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def missing_privilege() -> str:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "no unshare or ip command"
    for flag, what in (("-m", "mount"), ("-n", "network")):
        probe = subprocess.run(["unshare", flag, "true"], capture_output=True, text=True)
        if probe.returncode != 0:
            return f"cannot make a {what} namespace (unshare {flag}): {probe.stderr.strip()}"
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        return "PostgreSQL (initdb, pg_ctl) is not installed"
    return ""


CLONE_NEWNET = 0x40000000  # <sched.h>


def network_namespace(pid: str | int = "self") -> str:
    """The process's network namespace, as its /proc link names it (``net:[inode]``); "" if gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return ""


def enter_private_network() -> tuple[str, str]:
    """Move this process, and so every process it starts from now on, into a new network namespace
    with only loopback (127.0.0.0/8) up; -> (the host's namespace, the private one). Once per
    process: a second call stays in the private one. Needs the privilege ``unshare -n`` needs."""
    here = network_namespace()
    if os.environ.get("BIREAL_HOST_NETNS", here) != here:
        return os.environ["BIREAL_HOST_NETNS"], here  # already moved
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) for the cluster suite's private network")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    os.environ["BIREAL_HOST_NETNS"] = here
    return here, network_namespace()


class Memory:
    """Peak memory of the suite, sampled twice a second: the proportional set size (PSS: shared
    pages split between their users, so the torch libraries of many Ray workers count once) of this
    process, of the processes whose command line names one of ``markers`` (the daemons that
    ``ray start --head`` and ``pg_ctl`` leave behind), and of all their descendants. Other work on
    the machine is not counted."""

    def __init__(self):
        self.peak, self.at_peak, self.markers, self._stop = 0, {}, [], threading.Event()
        self.test_peak, self.test_at_peak = 0, {}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _read(pid: str, name: str) -> str:
        try:
            return Path(f"/proc/{pid}/{name}").read_text()
        except OSError:
            return ""

    def pids(self) -> set[str]:
        """This process, the marked daemons and all their descendants, as now."""
        return self._suite_pids()

    def _suite_pids(self) -> set[str]:
        children: dict[str, list[str]] = {}
        roots = {str(os.getpid())}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            stat = self._read(entry.name, "stat")
            if stat:
                children.setdefault(stat.rsplit(")", 1)[1].split()[1], []).append(entry.name)
            cmdline = self._read(entry.name, "cmdline")
            if any(m in cmdline for m in self.markers):
                roots.add(entry.name)
        found, todo = set(), list(roots)
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo.extend(children.get(pid, []))
        return found

    def _pss(self, pid: str) -> int:
        for line in self._read(pid, "smaps_rollup").splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.wait(0.5):
            pss = {pid: self._pss(pid) for pid in self._suite_pids()}
            total = sum(pss.values())
            if total > self.test_peak:  # (the suite's peak is never below the test's)
                self.test_peak, self.test_at_peak = total, self._by_program(pss)
                if total > self.peak:
                    self.peak, self.at_peak = total, self.test_at_peak

    def start_test(self) -> None:
        self.test_peak, self.test_at_peak = 0, {}

    def _by_program(self, pss: dict[str, int]) -> dict[str, int]:
        """PSS summed per program name (``comm``: raylet, ray::IDLE, postgres, python...)."""
        out: dict[str, int] = {}
        for pid, size in pss.items():
            name = self._read(pid, "comm").strip() or "?"
            out[name] = out.get(name, 0) + size
        return out

    def stop(self) -> float:
        self._stop.set()
        return self.peak / 2**30

    def breakdown(self, top: int = 8, this_test: bool = False) -> str:
        """The largest programs at the peak (of the suite, or of the current test), e.g.
        'python 1.90, ray::_trial 1.10, ...' (GiB)."""
        at_peak = self.test_at_peak if this_test else self.at_peak
        ranked = sorted(at_peak.items(), key=lambda kv: -kv[1])[:top]
        return ", ".join(f"{name} {size / 2**30:.2f}" for name, size in ranked)


class Cluster:
    def __init__(self, root, work, s3, pg, mlflow, ray, say, memory, netns):
        self.root, self.work, self.s3, self.pg, self.mlflow, self.ray = root, work, s3, pg, mlflow, ray
        self.say, self.memory = say, memory
        self.host_netns, self.netns = netns  # the host's network namespace, the suite's own

    def params(self, name: str, **sections) -> Path:
        """A params file in the driver's folder: everything shared lives in S3 / on the servers."""
        bucket = f"s3://{self.s3.bucket}"
        base = {
            "data": {"source": "demo"},
            "shard": {"samples_per_shard": 100, "processes": 1},
            "storage": {"artifacts": f"{bucket}/artifacts", "endpoint_url": self.s3.url},
            "train": {
                "shards": f"{bucket}/shards",
                "out": "checkpoints",
                "width": 0.25,
                "batch_size": 32,
                "loader_workers": 0,  # decode in the worker: no loader processes (memory)
                "max_steps_per_epoch": 3,
            },
            "pretrain": {"phase_epochs": [1, 0, 1]},
            "binarize": {"epochs": 1, "tuned_config": ""},
            "finetune": {"epochs": 1},
            "tune": {"enabled": False, "storage_path": f"{bucket}/tune"},
            "ray": {
                "address": self.ray.address,
                "num_workers": 2,
                "cpus_per_worker": 1,
                "storage_path": f"{bucket}/ray",
                "max_failures": 3,
            },
            "mlflow": {"tracking_uri": self.mlflow.uri, "experiment": name},
            "registry": {"model_name": f"bireal-{name}"},
        }
        for section, values in sections.items():
            base[section] = {**base.get(section, {}), **values}
        import yaml

        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(base))
        return path

    def bireal(self, *args: str, run_id: str, wait: bool = True, log: str = "driver.log"):
        """The CLI as the driver, in the work folder, joined to the cluster by the params file."""
        env = {**cluster_env(), "BIREAL_PIPELINE_RUN": run_id}
        out = (self.root / log).open("a")
        proc = subprocess.Popen(
            [str(BIN / "bireal"), *args],
            cwd=self.work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if not wait:
            return proc
        if wait_progressing(proc, [self.root / log], f"bireal {args[0]}") != 0:
            pytest.fail(f"bireal {' '.join(args)} failed:\n{(self.root / log).read_text()[-4000:]}")
        return proc

    def epochs_logged(self, experiment: str, stage: str) -> list[list[int]]:
        """Per MLflow run of ``stage``: the steps of its val_top1 history, as logged."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.mlflow.uri)
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], f"tags.`bireal.stage` = '{stage}'")
        return [sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_top1")) for r in runs]

    def stage_history(self, run_name: str) -> list[dict]:
        """The per-epoch history in the newest checkpoint Ray Train registered for the run, read from
        S3: what the workers trained and reported, independent of MLflow (which skips steps it has);
        [] before the first. Read in a subprocess: this process keeps torch out of its memory."""
        names = self.ray_checkpoints(run_name)
        if not names:
            return []
        data = self.s3.read(f"ray/{run_name}/{names[-1]}/train_state.pt")
        code = (
            "import io, json, sys, torch\n"
            "state = torch.load(io.BytesIO(sys.stdin.buffer.read()), weights_only=True)\n"
            "print(json.dumps(state['history'], default=str))\n"
        )
        python = [str(BIN / "python"), "-c", code]
        out = subprocess.run(python, input=data, capture_output=True, check=True, timeout=120)
        return json.loads(out.stdout)

    def ray_checkpoints(self, run_name: str) -> list[str]:
        """The checkpoints Ray Train has registered for the run: those its checkpoint manager's
        snapshot in S3 lists, so a re-launched run resumes from them. (A checkpoint the workers
        have uploaded but the controller has not yet recorded does not count.)"""
        snapshot = self.s3.read(f"ray/{run_name}/checkpoint_manager_snapshot.json")
        if snapshot is None:
            return []
        results = json.loads(snapshot).get("checkpoint_results") or []
        return sorted(r["checkpoint_dir_name"] for r in results)
