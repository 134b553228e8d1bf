"""Distributed training with PyTorch's own stack, run for real: torchrun (c10d rendezvous), gloo on CPU, DDP and
FSDP2, two "nodes" as two torchrun commands, on one host and across two network namespaces with their own
addresses. Every run is the real `gpt-train train` in fresh processes with a tiny model.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gpt_train import distributed, parallel
from gpt_train.config import Config, DistributedConfig, validate
from gpt_train.distributed import World, detect_world
from gpt_train.errors import ConfigError
from gpt_train.protocol import expand_nodelist
from helpers import REPO, cli, losses, read_metrics, tiny_data, train_args  # noqa: F401

# micro-batches of 2: 2 accumulation steps on 2 ranks, 4 on one, so that no_sync() is part of every run
STEPS = ["max_steps=6", "checkpoint.interval=2", "eval_interval=3", "sample_tokens=4", "train.micro_batch=2"]
FSDP = ["distributed.strategy=fsdp"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, flags: tuple[str, ...] = ("--standalone",), timeout: int = 150,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node=N FLAGS -m gpt_train ARGS` as a user types it."""
    cmd = [*TORCHRUN, f"--nproc-per-node={nproc}", *flags, "-m", "gpt_train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **ENV, **(env or {})})


def run_together(cmds: list[list[str]], timeout: int = 150, env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Start every command at once (one per "node"), wait for all; on a timeout kill exactly those we started."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, **ENV, **(env or {})}, start_new_session=True) for c in cmds]
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p, c in zip(procs, cmds):
            out, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the session of a process this test started
                p.wait()
    return results


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"rc={result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def cut_back(src: Path, dst: Path, step: int) -> Path:
    """A copy of a run directory as if the job had been stopped right after the checkpoint of `step`."""
    shutil.copytree(src, dst)
    for folder in (dst / "checkpoints").glob("step-*"):
        if int(folder.name[5:]) > step:
            shutil.rmtree(folder)
    (dst / "checkpoints" / "LATEST").write_text(f"step-{step:08d}\n")
    return dst


def assert_close(a: dict[int, float], b: dict[int, float], steps, tol: float) -> None:
    for s in steps:
        assert abs(a[s] - b[s]) <= tol, f"step {s}: {a[s]} vs {b[s]} (tolerance {tol})"


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than 127.x (torchrun's --local-addr for the two-node runs)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.123", 9))  # no packet is sent: this only picks the outgoing interface
            addr = s.getsockname()[0]
        if not addr.startswith("127.") and addr != "0.0.0.0":
            return addr
    except OSError:
        pass
    try:
        out = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    addrs = [line.split()[3].split("/")[0] for line in out.splitlines() if " lo " not in line and len(line.split()) > 3]
    return addrs[0] if addrs else None


# -- runs shared by several tests ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def one_rank(runs, tiny_data) -> Path:
    run = runs / "one"
    ok(cli(*train_args(tiny_data, str(run), *STEPS), env=ENV, timeout=150))
    return run


@pytest.fixture(scope="module")
def ddp2(runs, tiny_data) -> tuple[Path, str]:
    run = runs / "ddp2"
    return run, ok(torchrun(*train_args(tiny_data, str(run), *STEPS)))


@pytest.fixture(scope="module")
def fsdp2(runs, tiny_data) -> tuple[Path, str]:
    run = runs / "fsdp2"
    return run, ok(torchrun(*train_args(tiny_data, str(run), *STEPS, *FSDP)))


# -- the launcher's world, without a process group -----------------------------------------------------

def test_srun_environment_gives_ranks_nodes_and_master_from_the_nodelist():
    env = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "4242"}
    w = detect_world(env)
    assert (w.rank, w.local_rank, w.world_size, w.local_world_size, w.nodes) == (5, 1, 8, 4, 2)
    assert (w.launcher, w.master_addr, w.master_port) == ("srun", "gpu007", 20000 + 4242)
    assert detect_world({**env, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29400"}).master_addr == "10.1.2.3"
    assert detect_world({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).launcher == "single"  # sbatch's own shell
    tr = detect_world({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "n1", "MASTER_PORT": "123", "TORCHELASTIC_RUN_ID": "x"})
    assert (tr.launcher, tr.rank, tr.nodes, tr.master_addr) == ("torchrun", 3, 2, "n1")
    assert expand_nodelist("gpu[01-03,07],login1,a[9-10]") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1", "a9", "a10"]
    assert expand_nodelist("node1") == ["node1"]


def test_config_sets_communication_variables_and_the_master_except_under_torchrun():
    cfg = DistributedConfig(socket_ifname="eth0", ib="off", nccl_debug="WARN", async_error_handling="1")
    assert distributed.env_settings(cfg) == {"NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0",
                                             "NCCL_IB_DISABLE": "1", "NCCL_DEBUG": "WARN",
                                             "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert distributed.env_settings(DistributedConfig()) == {}  # unset: the environment is left alone
    assert "GLOO_SOCKET_IFNAME" not in distributed.env_settings(DistributedConfig(socket_ifname="^lo,docker"))
    srun = World(rank=0, world_size=4, local_world_size=2, launcher="srun", master_addr="gpu01", master_port=21000)
    assert distributed.rendezvous_address(srun, DistributedConfig()) == ("gpu01", 21000, "srun")
    assert distributed.rendezvous_address(srun, DistributedConfig(master_addr="10.0.0.9", master_port=3000)) == \
        ("10.0.0.9", 3000, "config")
    tr = World(world_size=2, local_world_size=1, launcher="torchrun", master_addr="n1", master_port=4000)
    assert distributed.rendezvous_address(tr, DistributedConfig(master_addr="x")) == ("n1", 4000, "torchrun")
    assert distributed.check_master(srun, "localhost", 1234) and "cannot use master address 'localhost'" in \
        distributed.check_master(srun, "localhost", 1234)
    assert distributed.check_master(srun, "127.0.0.1", 1234)
    assert distributed.check_master(srun, socket.gethostname(), 1234) is None  # the first node's own name
    assert distributed.check_master(World(world_size=2, local_world_size=2), "127.0.0.1", 1234) is None  # one node
    assert "not a TCP port" in distributed.check_master(srun, "10.0.0.1", 70000)


def test_a_batch_that_cannot_split_over_the_new_world_is_a_clear_error(tmp_path, tiny_data):
    cfg = Config()
    cfg.train.batch_tokens, cfg.train.micro_batch, cfg.model.block_size = 512, 4, 32  # 16 sequences
    validate(cfg, 4)
    with pytest.raises(ConfigError, match=r"train.batch_tokens' \(512\) must be a multiple of .* x 3 = 96"):
        validate(cfg, 3)
    # as a user meets it: a 16-rank world for a batch of 8 sequences, before any rendezvous
    env = {"RANK": "0", "WORLD_SIZE": "16", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "16"}
    result = cli(*train_args(tiny_data, str(tmp_path / "run"), "max_steps=2"), env=env, timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "train.batch_tokens' (256) must be a multiple of" in result.stderr and "x 16 = 512" in result.stderr


def test_the_default_preset_runs_on_two_ranks_with_a_smaller_micro_batch(tmp_path, tiny_data):
    # 4,096 tokens are 32 sequences of 128: 16 per rank, so micro-batches of 16 instead of the preset's 32
    result = torchrun("train", "default", f"data.dir={tiny_data}", f"run_dir={tmp_path / 'run'}", "max_steps=2",
                      "eval_batches=2", "sample_tokens=0", timeout=240)
    out = ok(result)
    assert ("batch 4,096 tokens = 16 seq (the most up to train.micro_batch=32 that divides a rank's share) x 128 x 2 "
            "rank(s) x 1 accumulation step(s)") in out
    assert "step      2/2" in out


def test_optimizer_state_is_saved_by_parameter_name_and_old_checkpoints_still_load():
    from gpt_train.config import ModelConfig
    from gpt_train.model import GPT
    from gpt_train.optim import build_optimizer

    def build():
        torch.manual_seed(0)
        model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64))
        return model, build_optimizer(model, Config(), "cpu")

    model, opt = build()
    _, loss = model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    loss.backward()
    opt.step()
    weights = parallel.model_state(model)
    assert "lm_head.weight" not in weights and "transformer.wte.weight" in weights  # the tied matrix once
    state = parallel.optimizer_state(model, opt)
    assert "transformer.h.0.mlp.c_fc.weight" in state["state"]
    assert all(isinstance(n, str) for g in state["param_groups"] for n in g["params"])
    for saved in (state, opt.state_dict()):  # by name, and the integer ids of checkpoints before names
        fresh, fresh_opt = build()
        parallel.load_optimizer_state(fresh, fresh_opt, saved)
        for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt.state[p][key], fresh_opt.state[q][key]), (name, key)


# -- torchrun on one node ------------------------------------------------------------------------------

def test_two_ranks_learn_exactly_what_one_rank_learns(one_rank, ddp2):
    run, out = ddp2
    assert "world: 2 rank(s) on 1 node(s) (2 per node), launcher torchrun, backend gloo, strategy ddp" in out
    assert "2 seq x 32 x 2 rank(s) x 2 accumulation step(s)" in out
    assert out.count("done: step 6") == 1  # rank 0 alone prints and writes
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    one, two = losses(one_rank), losses(run)
    assert_close(one, two, range(1, 7), tol=1e-4)  # the same samples per step: only summation order differs
    assert len(torch.load(run / "checkpoints/step-00000006/rng.pt", weights_only=True)) == 2  # every rank's RNG
    meta = json.loads((run / "checkpoints/step-00000006/meta.json").read_text())
    assert meta["world_size"] == 2 and meta["next_sample"] == 6 * 8
    weights = torch.load(run / "checkpoints/step-00000006/model.pt", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in weights) and "lm_head.weight" not in weights


def test_two_rank_checkpoint_resumes_on_two_ranks_exactly_and_on_one_rank(ddp2, runs, tiny_data):
    run, _ = ddp2
    reference = losses(run)
    again = cut_back(run, runs / "ddp2-again", 4)
    out = ok(torchrun(*train_args(tiny_data, str(again), *STEPS)))
    assert "(step 4)" in out and "resuming from" in out
    assert {s: losses(again)[s] for s in (5, 6)} == {s: reference[s] for s in (5, 6)}  # same world: bit for bit
    alone = cut_back(run, runs / "ddp2-on-one", 4)
    out = ok(cli(*train_args(tiny_data, str(alone), *STEPS), env=ENV, timeout=150))
    assert "world: 1 rank(s)" in out and "(step 4)" in out
    assert_close(losses(alone), reference, (5, 6), tol=1e-4)  # same token stream and schedule on 1 rank
    assert [r["step"] for r in read_metrics(alone) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_fsdp_learns_what_ddp_learns_and_its_checkpoint_resumes_under_ddp_and_one_process(fsdp2, ddp2, runs, tiny_data):
    run, out = fsdp2
    assert "strategy fsdp" in out and "done: step 6" in out
    reference = losses(ddp2[0])
    # Under bf16, FSDP computes with bf16 parameters (MixedPrecisionPolicy) where DDP autocasts fp32 ones: the
    # same steps, rounded in other places (measured: 6e-4 apart at step 6 of a loss of 10.5).
    assert_close(losses(run), reference, range(1, 7), tol=2e-3)
    weights = torch.load(run / "checkpoints/step-00000006/model.pt", weights_only=True)
    ddp_weights = torch.load(ddp2[0] / "checkpoints/step-00000006/model.pt", weights_only=True)
    assert weights.keys() == ddp_weights.keys()  # full tensors, plain names, the same file as DDP's
    assert all(weights[k].shape == ddp_weights[k].shape for k in weights)

    under_ddp = cut_back(run, runs / "fsdp-under-ddp", 4)
    ok(torchrun(*train_args(tiny_data, str(under_ddp), *STEPS)))
    assert_close(losses(under_ddp), losses(run), (5, 6), tol=2e-3)
    alone = cut_back(run, runs / "fsdp-on-one", 4)
    ok(cli(*train_args(tiny_data, str(alone), *STEPS), env=ENV, timeout=150))
    assert_close(losses(alone), losses(run), (5, 6), tol=2e-3)


def test_ddp_checkpoint_resumes_under_fsdp(ddp2, runs, tiny_data):
    run, _ = ddp2
    sharded = cut_back(run, runs / "ddp-under-fsdp", 4)
    out = ok(torchrun(*train_args(tiny_data, str(sharded), *STEPS, *FSDP)))
    assert "strategy fsdp" in out and "(step 4)" in out
    assert_close(losses(sharded), losses(run), (5, 6), tol=5e-4)


def test_fsdp_refuses_what_would_hang_or_diverge_before_sharding_anything():
    from gpt_train.config import ModelConfig
    from gpt_train.model import GPT

    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64))
    two = World(rank=0, world_size=2, local_world_size=2, launcher="torchrun")
    cfg = Config()
    cfg.distributed.strategy = "fsdp"
    cfg.train.precision = "fp16"
    with pytest.raises(ConfigError, match="does not support train.precision=fp16"):
        parallel.wrap(model, two, torch.device("cpu"), cfg)
    assert not parallel.is_sharded(model)
    assert parallel.wrap(model, World(), torch.device("cpu"), cfg) is model  # one process: nothing to wrap


GATHERED = textwrap.dedent("""
    import torch, torch.distributed as dist
    from gpt_train import distributed, parallel
    from gpt_train.config import Config
    from gpt_train.model import GPT
    cfg = Config()
    cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size, cfg.model.vocab_size = 2, 2, 16, 8, 64
    cfg.distributed.strategy, cfg.train.sample_tokens, cfg.train.precision = "fsdp", 0, "fp32"
    world = distributed.detect_world()
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = GPT(cfg.model)
    parallel.wrap(model, world, torch.device("cpu"), cfg)
    assert parallel.is_sharded(model)
    x = torch.randint(0, 64, (2, 8))
    with parallel.gathered(model):
        if world.rank == 0:  # the other rank does not take part: no collective may run in here
            with torch.no_grad():
                for _ in range(3):
                    logits, _ = model(x[:1, :4])
    _, loss = model(x, x)  # sharded training goes on afterwards
    loss.backward()
    dist.barrier()
    print(f"rank {world.rank} ok {type(model.lm_head.weight).__name__}", flush=True)
    dist.destroy_process_group()
""")


def test_fsdp_gathered_lets_rank_zero_run_the_model_alone(tmp_path):
    script = tmp_path / "gathered.py"
    script.write_text(GATHERED)
    cmd = [*TORCHRUN, "--nproc-per-node=2", "--standalone", str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, **ENV})
    out = ok(result)
    assert "rank 0 ok DTensor" in out and "rank 1 ok DTensor" in out


# -- two nodes -----------------------------------------------------------------------------------------

def node_cmd(data: str, run: Path, node: int, endpoint: str, local_addr: str, *extra: str) -> list[str]:
    return [*TORCHRUN, "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}", "--rdzv-id=gpt-train-test", f"--rdzv-conf=is_host={int(node == 0)}",
            f"--local-addr={local_addr}",
            "-m", "gpt_train", *train_args(data, str(run), *STEPS, *extra)]


def test_two_nodes_of_one_process_each(one_rank, runs, tiny_data):
    addr = non_loopback_address()
    if addr is None:
        pytest.skip("this machine has no IPv4 address besides loopback for the nodes' master")
    run = runs / "two-nodes"
    endpoint = f"127.0.0.1:{free_port()}"  # the agents' c10d rendezvous; the ranks then meet at `addr`
    results = run_together([node_cmd(tiny_data, run, i, endpoint, addr) for i in (0, 1)])
    out = "".join(ok(r) for r in results)
    assert f"world: 2 rank(s) on 2 node(s) (1 per node), launcher torchrun, backend gloo, strategy ddp, master {addr}:" in out
    assert out.count("rendezvous: node of rank") == 2  # each node said where it was going
    assert_close(losses(run), losses(one_rank), range(1, 7), tol=1e-4)


def test_two_nodes_told_to_meet_at_localhost_stop_with_a_clear_error(runs, tiny_data):
    run = runs / "two-nodes-localhost"
    endpoint = f"127.0.0.1:{free_port()}"
    results = run_together([node_cmd(tiny_data, run, i, endpoint, "127.0.0.1") for i in (0, 1)], timeout=120)
    for r in results:
        assert r.returncode != 0
        assert "a 2-node job cannot use master address '127.0.0.1'" in r.stderr and "--local-addr" in r.stderr
    assert not (run / "checkpoints").exists()


@pytest.mark.netns
def test_two_nodes_across_network_namespaces(netns_hosts, one_rank, runs, tiny_data):
    run = runs / "netns"
    endpoint = f"{netns_hosts.addrs[0]}:{free_port()}"
    cmds = [netns_hosts.prefix(i) + node_cmd(tiny_data, run, i, endpoint, netns_hosts.addrs[i],
                                             "distributed.socket_ifname=eth0") for i in (0, 1)]
    results = run_together(cmds)
    out = "".join(ok(r) for r in results)
    assert "world: 2 rank(s) on 2 node(s)" in out
    master = [line for line in out.splitlines() if line.startswith("world:")][0].rsplit("master ", 1)[1]
    assert master.split(":")[0] in netns_hosts.addrs  # the ranks met at a namespace's own address
    assert "set from config: NCCL_SOCKET_IFNAME=eth0, GLOO_SOCKET_IFNAME=eth0" in out
    assert_close(losses(run), losses(one_rank), range(1, 7), tol=1e-4)


# -- failures that must be one line, fast -----------------------------------------------------------

@pytest.mark.parametrize("addr", ["127.0.0.1", "no-such-host.invalid"])
def test_a_rendezvous_nobody_answers_fails_fast_naming_address_and_port(tmp_path, tiny_data, addr):
    port = free_port()  # nothing listens there
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": addr,
           "MASTER_PORT": str(port)}
    start = time.monotonic()
    result = cli(*train_args(tiny_data, str(tmp_path / "run"), "distributed.timeout_s=3"), env=env, timeout=90)
    assert time.monotonic() - start < 60
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # c10d's retry warnings are held back, not dumped
    assert f"rendezvous at {addr}:{port}" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_srun_job_on_two_nodes_with_a_localhost_master_is_an_error(tmp_path, tiny_data):
    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "7", "MASTER_ADDR": "localhost"}
    result = cli(*train_args(tiny_data, str(tmp_path / "run")), env=env, timeout=60)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "a 2-node job cannot use master address 'localhost'" in result.stderr
    assert "distributed.master_addr" in result.stderr


# -- a failure on one rank ends the job at once ----------------------------------------------------

FAULT = {"GPT_TRAIN_FAULT": "raise@step=5,rank=1"}


def run_until_fault_ends(cmds: list[list[str]], logs: Path, env: dict, timeout: int = 150) -> tuple[list[int], str, float]:
    """Start every command at once, output to files; (exit codes, all output, seconds from the injected
    fault to the last exit)."""
    logs.mkdir()
    files = [open(logs / f"{i}.log", "w") for i in range(len(cmds))]
    procs = [subprocess.Popen(c, stdout=f, stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True,
                              env={**os.environ, **ENV, **env, **extra}) for (c, extra), f in zip(cmds, files)]
    fault_at, deadline = None, time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if fault_at is None and any("fault: injecting" in (logs / f"{i}.log").read_text() for i in range(len(cmds))):
                fault_at = time.monotonic()
            time.sleep(0.2)
        ended = time.monotonic()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for f in files:
            f.close()
    text = "".join((logs / f"{i}.log").read_text() for i in range(len(cmds)))
    assert fault_at is not None, text[-3000:]
    return [p.returncode for p in procs], text, ended - fault_at


def test_an_exception_on_rank_one_ends_a_torchrun_job_at_once_with_its_traceback(tmp_path, tiny_data):
    cmd = [*TORCHRUN, "--nproc-per-node=2", "--standalone", "-m", "gpt_train",
           *train_args(tiny_data, str(tmp_path / "run"), "max_steps=40")]
    codes, out, seconds = run_until_fault_ends([(cmd, {})], tmp_path / "logs", FAULT)
    assert codes[0] != 0 and seconds < 60, out[-3000:]
    assert "gpt_train.faults.InjectedFault: injected fault at step 5 on rank 1" in out  # rank 1's own traceback
    assert "rank 1/2 failed" in out


def test_an_exception_on_rank_one_ends_plain_processes_at_once(tmp_path, tiny_data):
    # As srun starts them: no agent that would kill the survivor, only the rendezvous environment.
    port = str(free_port())
    cmds = [([sys.executable, "-m", "gpt_train", *train_args(tiny_data, str(tmp_path / "run"), "max_steps=40")],
             {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in (0, 1)]
    codes, out, seconds = run_until_fault_ends(cmds, tmp_path / "logs", FAULT)
    assert all(c not in (0, None) for c in codes) and seconds < 60, (codes, out[-3000:])
    assert "gpt_train.faults.InjectedFault: injected fault at step 5 on rank 1" in out
    assert "Traceback" in (tmp_path / "logs" / "1.log").read_text()
    assert "rank 0/2 failed" in out  # the survivor's collective failed when rank 1's connections closed


# -- gpt-train env ------------------------------------------------------------------------------------

def test_env_reports_what_a_run_would_see(tmp_path, tiny_data):
    run = tmp_path / "run"
    result = cli("env", "default", f"data.dir={tiny_data}", f"run_dir={run}", "distributed.ib=off", "--json",
                 env={"NCCL_IB_DISABLE": "0", "NCCL_DEBUG": "INFO"}, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["software"]["torch"] == torch.__version__ and report["software"]["backends"]["gloo"] is True
    assert report["devices"]["cpu"]["cores"] >= 1 and "bf16" in report["devices"]["cpu"]
    assert report["launcher"]["world_size"] == 1 and report["run"]["device"] == "cpu"
    assert report["communication"]["environment"]["NCCL_DEBUG"] == "INFO"
    assert report["communication"]["overridden"] == {"NCCL_IB_DISABLE": "0"}  # the config's value wins
    assert report["run_dir"]["writable"] is True and report["data"][0]["ok"] is True and report["problems"] == []
    assert not run.exists()  # the probe leaves nothing behind

    slurm = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_JOB_NODELIST": "localhost,n2", "SLURM_JOB_ID": "99"}
    bad_dir = tmp_path / "a-file"
    bad_dir.write_text("")
    result = cli("env", "default", f"data.dir={tiny_data}", f"run_dir={bad_dir}/run", "train.batch_tokens=2176",
                 env=slurm, timeout=60)
    assert result.returncode == 1
    text = result.stdout
    assert "launcher   srun: rank 2/4 (local 0/2) on 2 node(s), master localhost:20099 (srun)" in text
    assert "a 2-node job cannot use master address 'localhost'" in text
    assert f"run_dir '{bad_dir}/run' is not writable" in text
    assert "must be a multiple of" in text  # 17 sequences of 128 tokens do not split over 4 ranks
