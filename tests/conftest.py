"""Shared pytest fixtures.

Real-infrastructure fixtures (see docs/testing.md). Each brings its component up once per session with the
scripts in tests/infra/ and takes it down at the end of the session, unless it was already up when the
session started (then it is left as found) or GPT_TRAIN_INFRA_KEEP=1 is set.

    s3_server          moto_server on 127.0.0.1:<free port>; AWS_* env set so plain s3:// URLs reach it
    s3_bucket          (function) a fresh, empty bucket on a reset moto: "s3://<name>"
    slurm_cluster      one-node SLURM "gpttrain" (partitions debug, urgent); sets SLURM_CONF for the session
    slurm2_cluster     two-node SLURM "gpttrain2" (n1, n2 in network namespaces); a mapping of env for clients
    netns_hosts        two network namespaces gtt-n1 / gtt-n2 with 10.200.0.1 / 10.200.0.2
    docker_engine      a private dockerd; the value is its DOCKER_HOST (also set in os.environ)
    docker_base_image  "gpt-train-test-base:latest" (Debian bookworm, python3, CPU torch, numpy)

A component that cannot be brought up skips the tests that need it, or fails them when CI=true.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INFRA_SCRIPTS = REPO / "tests" / "infra"
INFRA_DIR = Path(os.environ.get("GPT_TRAIN_INFRA_DIR", "/tmp/gpt-train-infra"))


# --------------------------------------------------------------------------------------------------------------
# helpers


def infra_unavailable(reason: str) -> None:
    """Skip (or, with CI=true, fail) the requesting test: its infrastructure cannot be brought up."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"infrastructure unavailable (CI=true): {reason}", pytrace=False)
    pytest.skip(reason)


def _base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PATH", "/usr/bin:/bin")
    for d in ("/usr/sbin", "/sbin"):  # slurmctld, dockerd, ip ... when PATH is a non-login one
        if d not in path.split(":"):
            path += ":" + d
    env["PATH"] = path
    env.update(extra)
    return env


def _tail(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


class _Infra:
    """Runs one up script; remembers whether it started anything, so teardown only undoes its own work."""

    def __init__(self, up: str, down: str | None, timeout: float, **env: str):
        self.up, self.down, self.timeout, self.env = up, down, timeout, env
        self.started = False
        self.line = ""

    def bring_up(self) -> str:
        if sys.platform != "linux":
            infra_unavailable(f"{self.up}: needs Linux (this is {sys.platform})")
        if os.geteuid() != 0:
            infra_unavailable(f"{self.up}: needs root (running as uid {os.geteuid()})")
        if shutil.which("bash") is None:
            infra_unavailable(f"{self.up}: bash not found")
        t0 = time.monotonic()
        try:
            p = subprocess.run(["bash", str(INFRA_SCRIPTS / self.up)], capture_output=True, text=True,
                               timeout=self.timeout, env=_base_env(**self.env))
        except subprocess.TimeoutExpired as e:
            self.started = True  # may have started something: let teardown clean up
            self.tear_down()
            infra_unavailable(f"{self.up} timed out after {self.timeout:.0f}s: {_tail(str(e.stderr or ''))}")
        self.line = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
        if p.returncode != 0:
            self.started = True
            self.tear_down()
            infra_unavailable(f"{self.up} failed (rc={p.returncode}, {time.monotonic() - t0:.0f}s): "
                              f"{_tail(p.stderr) or _tail(p.stdout)}")
        self.started = ": started:" in self.line
        return self.line

    def tear_down(self) -> None:
        if not self.started or self.down is None or os.environ.get("GPT_TRAIN_INFRA_KEEP") == "1":
            return
        subprocess.run(["bash", str(INFRA_SCRIPTS / self.down)], capture_output=True, text=True, timeout=180,
                       env=_base_env())
        self.started = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------------------
# S3: moto_server


class S3Server:
    """A moto_server process. Attributes: endpoint_url, port, pid; storage_options (fresh dict per access)."""

    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc = proc
        self.pid = proc.pid
        self.port = port
        self.endpoint_url = f"http://127.0.0.1:{port}"

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs keyword arguments: fsspec.open(url, **storage_options), S3FileSystem(**storage_options)."""
        return {"client_kwargs": {"endpoint_url": self.endpoint_url}, "key": "testing", "secret": "testing"}

    def reset(self) -> None:
        """Drop all buckets and objects (moto's POST /moto-api/reset) and s3fs's cached filesystem instances."""
        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).close()
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()

    def fs(self):
        """A new s3fs.S3FileSystem bound to this server."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    exe = Path(sys.executable).parent / "moto_server"
    if not exe.exists():
        found = shutil.which("moto_server")
        if found is None:
            infra_unavailable("moto_server not found (pip install 'moto[server]')")
        exe = Path(found)
    try:
        import s3fs  # noqa: F401
    except ImportError:
        infra_unavailable("s3fs is not installed (pip install s3fs)")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    server = S3Server(proc, port)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{server.endpoint_url}/moto-api/", timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                infra_unavailable(f"moto_server did not come up on port {port}: {_tail(log.read_text())}")
            time.sleep(0.1)
    mp = pytest.MonkeyPatch()
    # botocore (hence s3fs/aiobotocore) honours AWS_ENDPOINT_URL: plain s3://bucket/key URLs reach moto
    mp.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    mp.delenv("AWS_PROFILE", raising=False)
    mp.delenv("AWS_SESSION_TOKEN", raising=False)
    try:
        yield server
    finally:
        mp.undo()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh bucket on an otherwise empty moto: yields "s3://<name>"."""
    s3_server.reset()
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.fs().mkdir(name)
    yield f"s3://{name}"
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


# --------------------------------------------------------------------------------------------------------------
# SLURM


class SlurmCluster(Mapping):
    """A test SLURM cluster. It is also a read-only mapping of the environment for its clients
    (os.environ + SLURM_CONF + PATH with /usr/sbin): subprocess.run([...], env=cluster) works.

    Attributes: name, conf (path of slurm.conf), env (dict), partitions, default_partition, nodes,
    cpus_per_node, state_dir (logs under state_dir/log).
    """

    def __init__(self, name: str, conf: Path, partitions: tuple[str, ...], nodes: tuple[str, ...],
                 cpus_per_node: int):
        self.name = name
        self.conf = conf
        self.state_dir = conf.parent.parent
        self.partitions = partitions
        self.default_partition = partitions[0]
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.env = _base_env(SLURM_CONF=str(conf))

    # Mapping over self.env
    def __getitem__(self, key: str) -> str:
        return self.env[key]

    def __iter__(self):
        return iter(self.env)

    def __len__(self) -> int:
        return len(self.env)

    def __repr__(self) -> str:
        return f"SlurmCluster({self.name!r}, conf={str(self.conf)!r}, nodes={self.nodes})"

    def run(self, *argv: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster; text output captured."""
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, check=check,
                              timeout=timeout, **kw)

    def sbatch(self, *args: str, wrap: str | None = None, cwd: str | os.PathLike | None = None) -> str:
        """sbatch --parsable ARGS [--wrap WRAP]; returns the job id."""
        argv = ["sbatch", "--parsable", *args] + (["--wrap", wrap] if wrap is not None else [])
        p = self.run(*argv, check=False, cwd=cwd)
        if p.returncode != 0:
            raise RuntimeError(f"sbatch failed: {p.stderr.strip()}")
        return p.stdout.strip().split(";")[0]

    def sacct(self, job_id: str, fields: str = "JobID,State,ExitCode,Elapsed",
              duplicates: bool = False) -> list[dict[str, str]]:
        """Allocation rows (-X) for the job from sacct; duplicates=True includes earlier (requeued) runs."""
        argv = ["sacct", "-n", "-X", "-P", "-o", fields, "-j", job_id] + (["--duplicates"] if duplicates else [])
        p = self.run(*argv, check=False)
        names = fields.split(",")
        return [dict(zip(names, line.split("|"))) for line in p.stdout.splitlines() if line.strip()]

    def state(self, job_id: str) -> str | None:
        """Current state: squeue while the controller knows the job live, else sacct. None if unknown."""
        p = self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False)
        if p.returncode == 0 and p.stdout.strip():
            return p.stdout.split()[0]
        rows = self.sacct(job_id, fields="State")
        return rows[-1]["State"].split()[0] if rows else None   # "CANCELLED by 0" -> "CANCELLED"

    def history(self, job_id: str) -> list[str]:
        """States of every run of the job, oldest first (sacct --duplicates), e.g. ['PREEMPTED', 'RUNNING']."""
        return [r["State"].split()[0] for r in self.sacct(job_id, fields="State", duplicates=True)]

    def wait_state(self, job_id: str, *states: str, timeout: float = 60, history: bool = False,
                   poll: float = 0.5) -> str:
        """Wait until the job is in one of STATES (history=True: any run of it was); returns the state seen.
        Raises TimeoutError with the last state seen."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        seen: object = None
        while True:
            if history:
                hist = self.history(job_id)
                hit = [s for s in hist if s in wanted]
                seen = hist
                if hit:
                    return hit[0]
            else:
                seen = self.state(job_id)
                if seen in wanted:
                    return seen
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} on {self.name}: wanted {sorted(wanted)} within {timeout}s, "
                                   f"last seen {seen}; logs in {self.state_dir / 'log'}")
            time.sleep(poll)

    def wait_gone(self, job_id: str, timeout: float = 60) -> None:
        """Wait until squeue no longer lists the job (finished, whatever the outcome)."""
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-j", job_id, check=False).stdout.strip():
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} on {self.name} still queued after {timeout}s")
            time.sleep(0.5)

    def cancel_all(self, timeout: float = 60) -> None:
        """Cancel every job and wait until the queue is empty."""
        ids = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if ids:
            self.run("scancel", *ids, check=False)
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """One-node cluster "gpttrain": node localhost with 4 CPUs (2 real cores, overcommitted); partitions
    debug (default) and urgent (preempts debug jobs with REQUEUE). SLURM_CONF is set in os.environ for the
    session, so submitit and plain sbatch/sacct calls reach it."""
    infra = _Infra("slurm_up.sh", "slurm_down.sh", timeout=600)
    infra.bring_up()
    conf = INFRA_DIR / "slurm" / "etc" / "slurm.conf"
    cluster = SlurmCluster("gpttrain", conf, ("debug", "urgent"), ("localhost",),
                           int(os.environ.get("GPT_TRAIN_SLURM_CPUS", "4")))
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", str(conf))
    try:
        yield cluster
    finally:
        mp.undo()
        infra.tear_down()


class NetnsHosts:
    """Two 'hosts': network namespaces on a bridge. Attributes: names, addrs, hostnames (resolvable via
    /etc/hosts), bridge_addr; prefix(i) / run(i, ...) run a command inside host i (0 or 1)."""

    names = ("gtt-n1", "gtt-n2")
    addrs = ("10.200.0.1", "10.200.0.2")
    hostnames = ("n1", "n2")
    bridge_addr = "10.200.0.254"

    def prefix(self, i: int) -> list[str]:
        """Argv prefix that runs a command in host i's network namespace (nsenter keeps /sys intact)."""
        return ["nsenter", f"--net=/var/run/netns/{self.names[i]}"]

    def run(self, i: int, *argv: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.prefix(i) + list(argv), env=kw.pop("env", _base_env()), capture_output=True,
                              text=True, check=check, timeout=timeout, **kw)

    def __repr__(self) -> str:
        return f"NetnsHosts({dict(zip(self.names, self.addrs))})"


@pytest.fixture(scope="session")
def netns_hosts() -> Iterator[NetnsHosts]:
    """Two network namespaces gtt-n1 (10.200.0.1), gtt-n2 (10.200.0.2) on bridge gtt-br0 (10.200.0.254);
    n1/n2 resolve via /etc/hosts. The slurm2 cluster runs its slurmd in these namespaces."""
    infra = _Infra("netns_up.sh", "netns_down.sh", timeout=300)
    infra.bring_up()
    try:
        yield NetnsHosts()
    finally:
        infra.tear_down()


@pytest.fixture(scope="session")
def slurm2_cluster(slurm_cluster: SlurmCluster, netns_hosts: NetnsHosts) -> Iterator[SlurmCluster]:
    """Two-node cluster "gpttrain2": nodes n1 (10.200.0.1) and n2 (10.200.0.2), 2 CPUs each, partition multi.
    os.environ is NOT changed: pass env=slurm2_cluster (or slurm2_cluster.env) to subprocesses, or
    monkeypatch.setenv("SLURM_CONF", slurm2_cluster["SLURM_CONF"]) around submitit calls."""
    infra = _Infra("slurm2_up.sh", "slurm2_down.sh", timeout=300)
    infra.bring_up()
    cluster = SlurmCluster("gpttrain2", INFRA_DIR / "slurm2" / "etc" / "slurm.conf", ("multi",), ("n1", "n2"), 2)
    try:
        yield cluster
    finally:
        infra.tear_down()


# --------------------------------------------------------------------------------------------------------------
# Docker


class DockerEngine(str):
    """The DOCKER_HOST URL of the harness's private dockerd (a str), with: host, env (os.environ + DOCKER_HOST +
    DOCKER_BUILDKIT=0), build_args (["--network", "host"]: containers have no network otherwise), run()."""

    env: dict[str, str]
    build_args: tuple[str, ...] = ("--network", "host")

    @property
    def host(self) -> str:
        return str(self)

    def run(self, *args: str, check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        """docker ARGS against this engine; text output captured."""
        return subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True, check=check,
                              timeout=timeout, **kw)


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """Private dockerd (own socket and data root). DOCKER_HOST and DOCKER_BUILDKIT=0 are set in os.environ
    for the session. Images persist across sessions in /tmp/gpt-train-infra/docker/root."""
    infra = _Infra("docker_up.sh", "docker_down.sh", timeout=300, GPT_TRAIN_DOCKER_BASE="0")
    infra.bring_up()
    host = f"unix://{INFRA_DIR / 'docker' / 'docker.sock'}"
    engine = DockerEngine(host)
    engine.env = _base_env(DOCKER_HOST=host, DOCKER_BUILDKIT="0")
    if shutil.which("docker", path=engine.env["PATH"]) is None:
        infra.tear_down()
        infra_unavailable("docker client not found on PATH")
    mp = pytest.MonkeyPatch()
    mp.setenv("DOCKER_HOST", host)
    mp.setenv("DOCKER_BUILDKIT", "0")
    try:
        yield engine
    finally:
        mp.undo()
        infra.tear_down()


@pytest.fixture(scope="session")
def docker_base_image(docker_engine: DockerEngine) -> str:
    """"gpt-train-test-base:latest": Debian bookworm minbase + python3, venv, pip, CPU torch, numpy.
    Built by tests/infra/docker_up.sh on first use (~2-3 min here), then cached in the engine's data root."""
    _Infra("docker_up.sh", None, timeout=1200).bring_up()   # the engine's fixture takes the engine down
    return "gpt-train-test-base:latest"


# ---- end of infrastructure fixtures ---------------------------------------------------------------------------
