"""Sanity tests of the real-infrastructure fixtures (tests/conftest.py, tests/infra/): each proves that its
fixture is the real thing. They skip (or fail with CI=true) when the infrastructure cannot be brought up."""

from __future__ import annotations

import socket
import time

import fsspec
import pytest


@pytest.mark.slurm
def test_slurm_sbatch_completes_in_sacct(slurm_cluster, tmp_path):
    out = tmp_path / "hostname.out"
    job = slurm_cluster.sbatch("-o", str(out), wrap="hostname; echo node=$SLURMD_NODENAME")
    assert slurm_cluster.wait_state(job, "COMPLETED", "FAILED", "CANCELLED", timeout=60) == "COMPLETED"
    text = out.read_text()
    assert socket.gethostname() in text and "node=localhost" in text
    assert slurm_cluster.sacct(job)[0]["ExitCode"] == "0:0"


@pytest.mark.slurm
def test_slurm_urgent_preempts_debug_with_requeue(slurm_cluster, tmp_path):
    low_out, high_out = tmp_path / "low.out", tmp_path / "high.out"
    low = slurm_cluster.sbatch("-p", "debug", "--requeue", "--open-mode=append", "-o", str(low_out),
                               wrap='echo "start restart=${SLURM_RESTART_COUNT:-0}"; sleep 300')
    try:
        slurm_cluster.wait_state(low, "RUNNING", timeout=30)
        # the node has 4 CPUs (overcommitted): --exclusive makes the urgent job need the low job's CPUs
        high = slurm_cluster.sbatch("-p", "urgent", "--exclusive", "-o", str(high_out), wrap="echo high ran")
        assert slurm_cluster.wait_state(low, "PREEMPTED", history=True, timeout=60) == "PREEMPTED"
        assert slurm_cluster.wait_state(high, "COMPLETED", timeout=60) == "COMPLETED"
        assert "high ran" in high_out.read_text()
        # requeued: held ~cred_expire (10 s) as PENDING (BeginTime), then runs again with SLURM_RESTART_COUNT=1
        slurm_cluster.wait_state(low, "RUNNING", timeout=60)
        for _ in range(20):
            if "start restart=1" in low_out.read_text():
                break
            time.sleep(0.5)
        starts = [ln for ln in low_out.read_text().splitlines() if ln.startswith("start")]
        assert starts[:2] == ["start restart=0", "start restart=1"]   # + slurmstepd's "CANCELLED ... PREEMPTION"
    finally:
        slurm_cluster.cancel_all()


@pytest.mark.slurm
@pytest.mark.netns
def test_slurm2_srun_spans_two_nodes(slurm2_cluster):
    p = slurm2_cluster.run("srun", "-N2", "hostname", timeout=60)
    assert sorted(p.stdout.split()) == ["n1", "n2"]
    p = slurm2_cluster.run("srun", "-N2", "-l", "bash", "-c", "hostname -I", timeout=60)
    assert sorted(p.stdout.split()) == ["0:", "10.200.0.1", "10.200.0.2", "1:"]


@pytest.mark.netns
def test_netns_hosts_reach_each_other(netns_hosts):
    p = netns_hosts.run(0, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
    assert netns_hosts.addrs[0] + "/24" in p.stdout
    netns_hosts.run(0, "ping", "-c1", "-W2", netns_hosts.addrs[1])
    netns_hosts.run(1, "ping", "-c1", "-W2", netns_hosts.hostnames[0])   # n1 resolves via /etc/hosts


@pytest.mark.s3
def test_s3fs_put_get_against_moto(s3_server, s3_bucket, tmp_path):
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x00gpt-train\xff" * 1000)
    fs = s3_server.fs()
    fs.put_file(str(src), f"{s3_bucket}/ckpt/src.bin")
    fs.get_file(f"{s3_bucket}/ckpt/src.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    # plain URLs, no storage options: AWS_ENDPOINT_URL routes them to moto
    with fsspec.open(f"{s3_bucket}/plain.txt", "w") as f:
        f.write("hello")
    with fsspec.open(f"{s3_bucket}/plain.txt", "r", **s3_server.storage_options) as f:
        assert f.read() == "hello"
    assert sorted(fs.find(s3_bucket)) == sorted([f"{s3_bucket[5:]}/ckpt/src.bin", f"{s3_bucket[5:]}/plain.txt"])


@pytest.mark.s3
def test_s3_bucket_is_fresh(s3_server, s3_bucket):
    assert s3_server.fs().ls("") == [s3_bucket[5:]]
    assert s3_server.fs().find(s3_bucket) == []


@pytest.mark.docker
def test_docker_base_image_imports_torch(docker_engine, docker_base_image):
    p = docker_engine.run("run", "--rm", docker_base_image, "python3", "-c",
                          "import torch; print(torch.__version__, torch.ones(3).sum().item())")
    assert p.stdout.split()[-1] == "3.0" and "+cpu" in p.stdout.split()[0]
