"""The start-up check (gpt_train/preflight.py) and the `preflight` fault (gpt_train/faults.py): one process on a
local or S3 run directory, and two real gloo processes on "nodes" n1 and n2 of this machine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gpt_train import faults, preflight
from gpt_train.distributed import World
from gpt_train.errors import ConfigError
from gpt_train.faults import Faults, parse
from gpt_train.preflight import INJECTED, Check, NodeUnhealthy
from gpt_train.storage import Store
from helpers import REPO

CPU = torch.device("cpu")
NO_FAULTS = Faults([], rank=0, attempt=1)


@pytest.fixture(autouse=True)
def _plain_host(monkeypatch):
    """The host a fault matches is this machine's, whatever the session runs under."""
    monkeypatch.delenv("SLURMD_NODENAME", raising=False)
    monkeypatch.delenv("GPT_TRAIN_NODE_REPORT", raising=False)


def probes(run_dir: Path) -> list[str]:
    return [p.name for p in run_dir.iterdir() if p.name.startswith(".preflight")] if run_dir.exists() else []


# -- the fault ---------------------------------------------------------------------------------------------

def test_preflight_needs_no_step_and_filters_like_the_others():
    assert parse("preflight") == [faults.Fault("preflight", None)]
    assert parse("preflight@host=n2,attempt=2;raise@step=3,rank=1") == [
        faults.Fault("preflight", None, host="n2", attempt=2), faults.Fault("raise", 3, rank=1)]
    assert parse("preflight@step=4") == [faults.Fault("preflight", None)]  # no step to fire at


@pytest.mark.parametrize("item", ["raise", "kill@rank=1", "hang@host=n1", "nan@attempt=1", "slow@", "bogus@host=a"])
def test_other_kinds_still_need_a_step(item):
    with pytest.raises(ConfigError, match=r"must be KIND@step=N\[,rank=R\]\[,host=H\]\[,attempt=A\] with KIND "
                                          r"one of raise, kill, hang, nan, slow, or preflight") as e:
        parse(item)
    assert "\n" not in str(e.value)


def test_a_fault_matches_the_slurm_node_name_before_the_host_name(monkeypatch):
    fault = parse(f"preflight@host={socket.gethostname()}")
    assert Faults(fault, rank=0, attempt=1).fails_preflight()
    monkeypatch.setenv("SLURMD_NODENAME", "n2")  # two slurmd nodes on one machine share its host name
    assert faults.node_name() == "n2"
    assert not Faults(fault, rank=0, attempt=1).fails_preflight()
    assert Faults(parse("preflight@host=n2"), rank=0, attempt=1).fails_preflight()
    assert not Faults(parse("preflight@host=n1"), rank=0, attempt=1).fails_preflight()


def test_the_preflight_fault_does_nothing_at_a_step(capsys):
    mine = Faults(parse("preflight@step=2;nan@step=5"), rank=0, attempt=1)
    assert mine.describe() == "preflight at start-up; nan at step 5"
    for step in (1, 2, 3):
        mine.before_step(step)
    assert capsys.readouterr().out == "" and not mine.corrupts_loss(2)
    assert not Faults(parse("nan@step=5"), rank=0, attempt=1).fails_preflight()


# -- one process -------------------------------------------------------------------------------------------

def test_a_healthy_process_passes_with_its_figures_and_leaves_nothing(tmp_path):
    run_dir = tmp_path / "run"
    checks = preflight.run(World(), CPU, Store(str(run_dir)), NO_FAULTS)
    [check] = checks
    assert check.ok and check.problem == "" and check.rank == 0 and check.host == socket.gethostname()
    assert check.device == "cpu" and check.device_ms > 0 and check.storage_ms > 0
    assert check.allreduce_ms is None  # one process: no process group to test
    assert run_dir.is_dir() and probes(run_dir) == []
    said = []
    preflight.enforce(checks, said.append, rank=0)
    assert said == [f"preflight: 1 rank(s) on 1 host(s) ok: matmul on cpu {check.device_ms:.3g} ms, "
                    f"run_dir write/read/delete {check.storage_ms:.3g} ms"]
    figures = json.loads(json.dumps(preflight.summary(checks)))
    assert figures["ok"] and figures["hosts"][check.host]["storage_ms"] == {"min": check.storage_ms,
                                                                            "max": check.storage_ms}


def test_only_local_rank_zero_checks_storage(tmp_path):
    class Untouchable(Store):
        def write_bytes(self, rel, data):
            raise AssertionError("local rank 1 wrote to the run directory")

    [check] = preflight.run(World(rank=1, local_rank=1, world_size=2, local_world_size=2), CPU,
                            Untouchable(str(tmp_path)), NO_FAULTS)
    assert check.ok and check.storage_ms is None


def test_a_run_dir_that_cannot_be_written_fails_the_check(tmp_path):
    (tmp_path / "file").write_text("a file where the run directory's parent should be")  # defeats root, too
    [check] = preflight.run(World(), CPU, Store(str(tmp_path / "file" / "run")), NO_FAULTS)
    assert not check.ok and check.storage_ms is None
    assert check.problem.startswith(f"storage: cannot write '{tmp_path}/file/run/.preflight-")
    assert "\n" not in check.problem
    assert list(preflight.failed_hosts([check])) == [check.host]


def test_a_file_that_reads_back_different_fails_the_check_and_is_still_deleted(tmp_path):
    class Corrupting(Store):
        def read_bytes(self, rel):
            data = super().read_bytes(rel)
            return data[:-1] + bytes([data[-1] ^ 1])

    [check] = preflight.run(World(), CPU, Corrupting(str(tmp_path)), NO_FAULTS)
    assert not check.ok and "bytes that differ from the 4096 written" in check.problem
    assert probes(tmp_path) == []


def test_a_store_that_does_not_answer_fails_the_check_in_time(tmp_path):
    class Hanging(Store):
        def write_bytes(self, rel, data):
            time.sleep(30)

    start = time.monotonic()
    [check] = preflight.run(World(), CPU, Hanging(str(tmp_path)), NO_FAULTS, timeout_s=0.5)
    assert time.monotonic() - start < 10
    assert not check.ok and check.problem == "storage: no answer within 0.5 s"


def test_a_device_that_fails_is_a_failed_check_not_a_crash(tmp_path):
    # The meta device computes shapes only: copying its matmul's result out raises, as a broken device would.
    [check] = preflight.run(World(), torch.device("meta"), Store(str(tmp_path)), NO_FAULTS)
    assert not check.ok and check.problem.startswith("device meta: NotImplementedError: ")
    assert check.storage_ms is not None  # the other checks still ran


def test_the_fault_fails_the_check_of_its_host_and_attempt_only(tmp_path):
    here = socket.gethostname()

    def check(spec: str, attempt: int = 1) -> Check:
        return preflight.run(World(), CPU, Store(str(tmp_path)), Faults(parse(spec), rank=0, attempt=attempt))[0]

    failed = check(f"preflight@host={here}")
    assert not failed.ok and failed.problem == INJECTED and failed.storage_ms is not None
    assert check("preflight@host=other").ok
    assert check("preflight@attempt=2", attempt=1).ok
    assert check("preflight@attempt=2", attempt=2).problem == INJECTED


# -- the verdict -------------------------------------------------------------------------------------------

def checks_of(*rows: tuple[int, str, str]) -> list[Check]:
    return [Check(rank=r, host=h, ok=not p, problem=p, device="cpu", device_ms=1.0, allreduce_ms=2.0 + r,
                  storage_ms=3.0 if r % 2 == 0 else None) for r, h, p in rows]


def test_failed_hosts_names_each_host_once_with_its_ranks():
    checks = checks_of((0, "n1", ""), (1, "n1", ""), (2, "n2", INJECTED), (3, "n2", INJECTED), (4, "n3", "x"),
                       (5, "n3", "y"))
    assert preflight.failed_hosts(checks) == {"n2": f"ranks 2, 3: {INJECTED}", "n3": "rank 4: x; rank 5: y"}
    figures = preflight.summary(checks)
    assert not figures["ok"] and figures["allreduce_ms"] == {"min": 2.0, "max": 7.0}
    assert figures["hosts"]["n1"] == {"ok": True, "ranks": [0, 1], "devices": ["cpu"], "device_ms_max": 1.0,
                                      "allreduce_ms": {"min": 2.0, "max": 3.0},
                                      "storage_ms": {"min": 3.0, "max": 3.0}, "problem": ""}


def test_enforce_reports_each_failed_host_from_rank_zero_and_raises(tmp_path, monkeypatch):
    report = tmp_path / "nodes.txt"
    monkeypatch.setenv("GPT_TRAIN_NODE_REPORT", str(report))
    checks = checks_of((0, "n1", ""), (1, "n2", INJECTED), (2, "n3", "storage: full"))
    said: list[str] = []
    with pytest.raises(NodeUnhealthy) as e:
        preflight.enforce(checks, said.append, rank=0)
    assert e.value.hosts == {"n2": f"rank 1: {INJECTED}", "n3": "rank 2: storage: full"}
    assert not isinstance(e.value, preflight.UserError)  # not the user's doing: no EXIT_USER_ERROR
    assert report.read_text() == f"n2\trank 1: {INJECTED}\nn3\trank 2: storage: full\n"
    assert said[0].startswith("preflight: 3 rank(s) on 3 host(s) FAILED on 2 host(s): ")
    assert said[1] == (f"preflight failed on 2 of 3 host(s): n2 (rank 1: {INJECTED}); n3 (rank 2: storage: full); "
                       f"named in {report}, so that the requeued job leaves them out")
    with pytest.raises(NodeUnhealthy):  # another rank raises the same, and leaves the report to rank 0
        preflight.enforce(checks, lambda line: None, rank=1)
    assert report.read_text().count("\n") == 2


def test_enforce_without_a_node_report_says_so(monkeypatch):
    said: list[str] = []
    with pytest.raises(NodeUnhealthy, match=r"^preflight failed on 1 of 1 host\(s\): n1 \(rank 0: x\)$"):
        preflight.enforce(checks_of((0, "n1", "x")), said.append, rank=0)
    assert said[1].endswith("GPT_TRAIN_NODE_REPORT is not set: nothing tells the launcher to leave them out")


def test_enforce_passes_healthy_checks_quietly_but_for_the_figures():
    said: list[str] = []
    preflight.enforce(checks_of((0, "n1", ""), (1, "n2", "")), said.append, rank=0)
    assert said == ["preflight: 2 rank(s) on 2 host(s) ok: matmul on cpu 1 ms, all-reduce of 1 MiB 2-3 ms, "
                    "run_dir write/read/delete 3 ms"]


# -- object storage ----------------------------------------------------------------------------------------

def test_an_s3_run_dir_is_checked_and_left_clean(s3_bucket):
    store = Store(f"{s3_bucket}/run")
    [check] = preflight.run(World(), CPU, store, NO_FAULTS)
    assert check.ok and check.storage_ms > 0, check.problem
    assert store.listdir() == []
    [check] = preflight.run(World(), CPU, Store("s3://no-such-bucket-for-gpt-train/run"), NO_FAULTS)
    assert not check.ok and check.problem.startswith("storage: cannot write 's3://no-such-bucket-for-gpt-train/run/")


# -- two processes -----------------------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import dataclasses, datetime, json, sys
    import torch, torch.distributed as dist
    from gpt_train import distributed, preflight
    from gpt_train.faults import Faults
    from gpt_train.storage import Store
    world = distributed.detect_world()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    if sys.argv[2] == "corrupt" and world.rank == 1:  # what rank 1 receives is off by one in one place
        real = dist.all_reduce
        def corrupting(t, *args, **kwargs):
            work = real(t, *args, **kwargs)
            t.view(-1)[-1] += 1
            return work
        dist.all_reduce = corrupting
    checks = preflight.run(world, torch.device("cpu"), Store(sys.argv[1]), Faults.from_env(world.rank, 1), 20.0)
    said, hosts = [], None
    try:
        preflight.enforce(checks, said.append if world.rank == 0 else (lambda line: None))  # its rank: the group's
    except preflight.NodeUnhealthy as e:
        hosts = e.hosts
    dist.destroy_process_group()
    print("RESULT " + json.dumps({"checks": [dataclasses.asdict(c) for c in checks], "hosts": hosts, "said": said}))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(tmp_path: Path, fault: str, how: str = "plain") -> tuple[list[Check], dict | None, list[str]]:
    """Two real gloo ranks, one per "node" (n1, n2: SLURM node names on this one machine); their checks, after
    asserting that both hold the same; the hosts both raised NodeUnhealthy for (or None); what rank 0 said."""
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "TORCHELASTIC", "GPT_TRAIN"))}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "run"), how], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**env, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "GLOO_SOCKET_IFNAME": "lo",
                                   "SLURMD_NODENAME": f"n{r + 1}", "GPT_TRAIN_FAULT": fault,
                                   "GPT_TRAIN_NODE_REPORT": str(tmp_path / "nodes.txt")})
             for r in (0, 1)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-3000:]
        results.append(json.loads(out.rsplit("RESULT ", 1)[1]))
    assert results[0]["checks"] == results[1]["checks"]  # every rank holds every rank's figures
    assert results[0]["hosts"] == results[1]["hosts"]  # and comes to the same verdict
    assert probes(tmp_path / "run") == []
    return [Check(**c) for c in results[0]["checks"]], results[0]["hosts"], results[0]["said"]


def test_two_ranks_agree_that_the_node_of_rank_one_failed(tmp_path):
    (first, second), hosts, said = two_nodes(tmp_path, "preflight@host=n2")
    assert (first.rank, first.host, first.ok) == (0, "n1", True)
    assert (second.rank, second.host, second.ok, second.problem) == (1, "n2", False, INJECTED)
    assert first.allreduce_ms > 0 and second.allreduce_ms > 0  # the fault did not keep rank 1 out of it
    assert first.storage_ms > 0 and second.storage_ms > 0  # one rank per node: both
    assert hosts == {"n2": f"rank 1: {INJECTED}"}
    assert (tmp_path / "nodes.txt").read_text() == f"n2\trank 1: {INJECTED}\n"  # once, from rank 0
    assert said[0].startswith("preflight: 2 rank(s) on 2 host(s) FAILED on 1 host(s): ")


def test_a_wrong_all_reduce_sum_fails_the_rank_that_received_it(tmp_path):
    (first, second), hosts, said = two_nodes(tmp_path, "", how="corrupt")
    assert first.ok and not second.ok
    assert second.problem == f"all-reduce: 1 of {(1 << 20) // 4} sums are not 3"
    assert hosts == {"n2": f"rank 1: {second.problem}"}
