"""The GPU paths, checked on a CPU: which device a rank takes and when it must refuse, the precision and the MFU
peak a GPU gets, what the Docker entrypoint starts, and what the docs promise about resuming on GPU.

No GPU is needed: device counts, names, capabilities and CUDA's availability are monkeypatched; GPU device nodes
and `nvidia-smi` are fakes in tmp_path; the entrypoint runs for real in dry-run mode, with torch's CUDA faked
by a sitecustomize when a case needs GPUs that work.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import pytest
import torch

from gpt_train import distributed, precision
from gpt_train.config import load_config
from gpt_train.distributed import World, cuda_device_count, cuda_index, gpus_present, pick_device
from gpt_train.errors import UserError
from helpers import REPO

PATH = os.environ["PATH"]  # before `machine` narrows it to its fake bin/
NVIDIA_SMI = "#!/bin/sh\n" + "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})"\n' for i in range(8))


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A machine with no GPU of any kind: no device nodes, no nvidia-smi, no CUDA_VISIBLE_DEVICES, no CUDA.
    Tests add what they need: `dev` (device nodes go there), `bin` (on PATH), `smi()` (a fake nvidia-smi)."""
    dev, bin_ = tmp_path / "dev", tmp_path / "bin"
    dev.mkdir()
    bin_.mkdir()
    monkeypatch.setattr(distributed, "NVIDIA_DEVICE_NODES", str(dev / "nvidia[0-9]*"))
    monkeypatch.setenv("PATH", str(bin_))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

    def smi():
        (bin_ / "nvidia-smi").write_text(NVIDIA_SMI)
        (bin_ / "nvidia-smi").chmod(0o755)

    return SimpleNamespace(dev=dev, bin=bin_, smi=smi)


def too_old_driver(monkeypatch):
    """CUDA as a driver older than torch's CUDA leaves it: GPUs there, is_available() False, init() says why."""
    def init():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040). Please update it.")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "init", init)


# -- 1. no silent fall back to the CPU ------------------------------------------------------------------------

@pytest.mark.parametrize("evidence", ["device node", "CUDA_VISIBLE_DEVICES", "nvidia-smi"])
def test_auto_and_cuda_refuse_gpus_that_cuda_cannot_use(machine, monkeypatch, evidence):
    too_old_driver(monkeypatch)
    if evidence == "device node":
        (machine.dev / "nvidia0").write_text("")
        (machine.dev / "nvidiactl").write_text("")  # not a GPU: not counted, not named
    elif evidence == "CUDA_VISIBLE_DEVICES":
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    else:
        machine.smi()
    present = gpus_present()
    assert present and "nvidiactl" not in present
    for requested in ("auto", "cuda"):
        with pytest.raises(UserError) as e:
            pick_device(requested, World())
        msg = str(e.value)
        assert f"train.device={requested}" in msg and present in msg and "CUDA cannot use them" in msg
        assert "driver on your system is too old" in msg and "built for CUDA 12.8" in msg
        assert "train.device=cpu" in msg
    with pytest.raises(UserError, match="CUDA cannot use them"):
        cuda_device_count()  # what the Docker entrypoint counts with
    # the way out the message names, and GPUs hidden on purpose, both train on the CPU
    assert pick_device("cpu", World()) == torch.device("cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpus_present() == "" and pick_device("auto", World()) == torch.device("cpu")


def test_a_cpu_only_torch_on_a_gpu_machine_says_so(machine, monkeypatch):
    (machine.dev / "nvidia3").write_text("")
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    with pytest.raises(UserError, match=r"CPU-only build \(torch.version.cuda is None\): install a CUDA build"):
        pick_device("auto", World())


def test_a_machine_without_gpus_trains_on_cpu_under_auto_and_counts_none(machine):
    assert gpus_present() == "" and cuda_device_count() == 0
    assert pick_device("auto", World()) == torch.device("cpu")
    with pytest.raises(UserError, match="train.device=cuda but no CUDA device is visible"):
        pick_device("cuda", World())


def test_the_gpu_presets_ask_for_cuda_and_still_load_on_cpu(machine):
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        cfg = load_config(name)  # validation only: loading needs no GPU
        assert cfg.train.device == "cuda", name
        with pytest.raises(UserError, match="train.device=cuda but no CUDA device"):
            pick_device(cfg.train.device, World())  # a GPU preset on a CPU machine stops, it does not train there
    assert load_config("default").train.device == "auto"  # the small preset still runs anywhere


# -- the Docker entrypoint counts GPUs the way the ranks do --------------------------------------------------

SITECUSTOMIZE = """
import os
if os.environ.get("FAKE_CUDA_COUNT") is not None:
    import torch
    n = int(os.environ["FAKE_CUDA_COUNT"])
    torch.cuda.is_available = lambda: n > 0
    torch.cuda.device_count = lambda: n
"""


def entrypoint(tmp_path, *args: str, cuda: int | None = None, **env: str) -> subprocess.CompletedProcess:
    """docker/entrypoint.sh ARGS in dry-run mode, with the fake nvidia-smi (8 GPUs) on PATH and, when `cuda` is
    given, torch's CUDA faked to report that many usable GPUs (0: GPUs that CUDA cannot use)."""
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    full = {k: v for k, v in os.environ.items() if not k.startswith(("CUDA_", "NPROC_", "TORCHRUN_", "OMP_"))}
    full.update(PATH=f"{tmp_path / 'bin'}:{PATH}", PYTHON=sys.executable, GPT_TRAIN_DRY_RUN="1",
                PYTHONPATH=str(tmp_path / "site"), **env)
    if cuda is not None:
        full["FAKE_CUDA_COUNT"] = str(cuda)
    return subprocess.run(["/usr/bin/env", "bash", str(REPO / "docker" / "entrypoint.sh"), *args], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=180)


def test_entrypoint_starts_the_ranks_cuda_can_use_and_stops_on_gpus_it_cannot(machine, tmp_path):
    machine.smi()  # NVML sees 8 GPUs
    # CUDA sees 3 of them (CUDA_VISIBLE_DEVICES, a binding): 3 ranks, the count the ranks will find
    three = entrypoint(tmp_path, "gpt2", cuda=3, CUDA_VISIBLE_DEVICES="0,1,2")
    assert three.returncode == 0, three.stderr
    argv = shlex.split(three.stdout)
    assert "--nproc-per-node=3" in argv and argv[-3:] == ["gpt_train", "train", "gpt2"], three.stdout
    # CUDA cannot start (a driver older than the image's CUDA): a loud stop, not one process on the CPU
    broken = entrypoint(tmp_path, "gpt2", cuda=0)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "CUDA cannot use them" in broken.stderr and "nvidia-smi lists 8 GPU(s)" in broken.stderr
    assert "train.device=cpu" in broken.stderr and broken.stdout == ""
    assert "training in one process on CPU" not in broken.stderr
    # asking for the CPU is the way out: one plain process, no GPU counted
    cpu = entrypoint(tmp_path, "gpt2", "train.device=cpu")
    assert cpu.returncode == 0, cpu.stderr
    assert shlex.split(cpu.stdout) == [sys.executable, "-m", "gpt_train.supervise", "--ranks", "1", "--",
                                       sys.executable, "-m", "gpt_train", "train", "gpt2", "train.device=cpu"]
    assert "train.device=cpu: training in one process on CPU" in cpu.stderr


# -- 2. bf16 only where it is native --------------------------------------------------------------------------

CUDA0 = torch.device("cuda", 0)


def test_auto_precision_takes_fp16_where_bf16_is_only_emulated(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    # a T4 (7.5) under a torch with including_emulation: emulated bf16 "is supported", native is not
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert precision.choose("auto", CUDA0) == "fp16"
    assert "no hardware support" in precision.check("bf16", CUDA0)
    assert precision.check("fp16", CUDA0) is None
    # an A100 (8.0): native
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert precision.choose("auto", CUDA0) == "bf16" and precision.check("bf16", CUDA0) is None


def test_without_including_emulation_the_compute_capability_decides(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # an older torch: emulation counts, no way to ask
    for capability, expected in [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert precision.choose("auto", CUDA0) == expected, capability
        assert (precision.check("bf16", CUDA0) is None) == (expected == "bf16"), capability


# -- 3. GPU binding -------------------------------------------------------------------------------------------

@pytest.fixture
def gpus(monkeypatch, tmp_path):
    """A fake CUDA whose visible GPUs are given per call: gpus(["GPU-a", "GPU-b"]) makes this process see those
    two (by UUID, as every process of the node names them). Lock files go to tmp_path; one SLURM job step."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    held = []

    def see(uuids: list[str]):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(uuids))
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=uuids[i]))

    def as_another_process():
        """Forget this process's claim but keep its lock held, as another task of the node would."""
        held.extend(lock for _, lock in distributed._CLAIMED.values())
        distributed._CLAIMED.clear()

    yield SimpleNamespace(see=see, chosen=chosen, next_task=as_another_process)
    as_another_process()
    for lock in held:
        lock.close()


def srun(local_rank: int, local_world_size: int = 8) -> World:
    return World(rank=local_rank, local_rank=local_rank, world_size=local_world_size, local_world_size=local_world_size,
                 launcher="srun", master_addr="n1", master_port=20077)


def test_each_rank_takes_a_gpu_of_its_own_whatever_subset_it_sees(gpus):
    node = [f"GPU-{i}" for i in range(8)]
    # every task sees all 8 (no binding, or torchrun): its local rank
    gpus.see(node)
    assert [cuda_index(srun(r), 8) for r in range(8)] == list(range(8))
    # one GPU per task (--gpus-per-task=1): GPU 0 of its own one
    gpus.see(node[5:6])
    assert cuda_index(srun(5), 1) == 0
    assert pick_device("cuda", srun(5)) == torch.device("cuda", 0) and gpus.chosen == [0]
    # --gpu-bind=closest under SLURM's default block:cyclic: ranks 0,2,4,6 share GPUs 0-3, ranks 1,3,5,7 GPUs 4-7;
    # local_rank % 4 alone would put ranks 0 and 4 on one GPU
    taken = {}
    for r in (0, 2, 4, 6, 1, 3, 5, 7):
        subset = node[:4] if r % 2 == 0 else node[4:]
        gpus.see(subset)
        index = pick_device("cuda", srun(r)).index
        assert pick_device("cuda", srun(r)).index == index  # asked again, the same process keeps its GPU
        taken[r] = subset[index]
        gpus.next_task()
    assert sorted(taken.values()) == node, taken
    assert [taken[r] for r in (0, 2)] == ["GPU-0", "GPU-2"]  # the first choice, local_rank % 4, where it is free


def test_ranks_that_share_a_subset_in_block_order_take_local_rank_mod_k_and_extra_ranks_are_an_error(gpus,
                                                                                                     monkeypatch):
    gpus.see([f"GPU-{i}" for i in range(4)])  # -m *:block: ranks 0-3 (on socket 0) see GPUs 0-3
    indices = []
    for r in range(4):
        indices.append(pick_device("cuda", srun(r)).index)
        gpus.next_task()
    assert indices == [0, 1, 2, 3]
    with pytest.raises(UserError, match=r"local rank 4: all 4 GPU\(s\) it sees are taken by other ranks of this job"):
        pick_device("cuda", srun(4))  # a fifth rank on four GPUs
    monkeypatch.setenv("SLURM_STEP_ID", "1")  # another job step on the node does not compete with this one
    assert pick_device("cuda", srun(0)).index == 0


def test_torchrun_with_fewer_gpus_than_local_ranks_is_an_error(gpus):
    gpus.see(["GPU-0", "GPU-1"])
    world = World(rank=3, local_rank=3, world_size=4, local_world_size=4, launcher="torchrun")
    with pytest.raises(UserError, match="local rank 3 has no GPU: 2 visible on this node for 4 local rank"):
        pick_device("cuda", world)
    world = World(rank=1, local_rank=1, world_size=4, local_world_size=4, launcher="torchrun")
    with pytest.raises(UserError, match="local rank 1 has no GPU"):  # every rank stops, not only those past the end
        pick_device("cuda", world)


# -- 4. MFU against the right peak ----------------------------------------------------------------------------

@pytest.fixture
def allow_tf32():
    """Set torch.backends.cuda.matmul.allow_tf32 (a property of torch's, which monkeypatch cannot restore)."""
    before = torch.backends.cuda.matmul.allow_tf32
    yield lambda value: setattr(torch.backends.cuda.matmul, "allow_tf32", value)
    torch.backends.cuda.matmul.allow_tf32 = before


DATASHEET = [  # (torch.cuda.get_device_name(), precision, TF32 matmuls allowed, the dense peak in TFLOP/s)
    ("NVIDIA H100 80GB HBM3", "bf16", False, 989.4),  # SXM
    ("NVIDIA H100 PCIe", "bf16", False, 756.5),
    ("NVIDIA H100 NVL", "fp16", False, 835.5),
    ("NVIDIA H200", "bf16", False, 989.4),
    ("NVIDIA B200", "bf16", False, 2250),
    ("NVIDIA A100-SXM4-80GB", "bf16", False, 312),
    ("NVIDIA A100 80GB PCIe", "bf16", False, 312),
    ("NVIDIA L4", "bf16", False, 121),  # not the L40S's 362, whose name contains "L4"
    ("NVIDIA L40S", "bf16", False, 362),
    ("NVIDIA L40", "bf16", False, 181),
    ("Tesla V100-SXM2-32GB", "fp16", False, 125),
    ("AMD Instinct MI300X", "bf16", False, 1307.4),
    ("NVIDIA H100 80GB HBM3", "fp32", False, 66.9),  # fp32 matmuls
    ("NVIDIA H100 80GB HBM3", "fp32", True, 494.7),  # fp32 with TF32 matmuls allowed
    ("NVIDIA A100-SXM4-40GB", "fp32", True, 156),
    ("Tesla V100-SXM2-16GB", "fp32", True, 15.7),  # no TF32 on a V100: fp32 whatever is allowed
]


def test_a_gpu_is_measured_against_its_own_datasheet_peak(monkeypatch, allow_tf32):
    monkeypatch.setattr(precision, "measured_peak", lambda *a, **k: pytest.fail("measured a GPU with a datasheet"))
    for name, prec, tf32, tflops in DATASHEET:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        allow_tf32(tf32)
        assert precision.peak_flops(CUDA0, prec) == pytest.approx(tflops * 1e12), (name, prec, tf32)


def test_a_gpu_without_a_datasheet_number_measures_its_peak_with_a_matmul_once(monkeypatch, allow_tf32, tmp_path):
    calls = []
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(precision, "measured_peak", lambda dtype, **k: calls.append((dtype, k)) or 42e12)
    allow_tf32(True)  # MI300X fp32: measured even so
    for name, prec in [("NVIDIA Future GPU", "bf16"), ("NVIDIA A10G", "bf16"), ("Tesla T4", "bf16"),
                       ("AMD Instinct MI300X", "fp32"), ("NVIDIA GH200 480GB", "bf16")]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert precision.peak_flops(CUDA0, prec) == 42e12, name
    assert calls[0] == (torch.bfloat16, {"device": "cuda:0"}) and calls[3][0] == torch.float32
    assert precision.peak_flops(CUDA0, "bf16") == 42e12 and len(calls) == 5, "remembered, not measured again"
    assert "NVIDIA GH200 480GB|bf16" in (tmp_path / "gpt-train" / "peak_flops.json").read_text()
    assert precision.GPU_PEAKS["Tesla T4"]["fp16"] == 65e12  # a T4 runs fp16 (auto), which it has a number for
    monkeypatch.undo()
    assert precision.measured_peak(torch.float32, 64, 0.01, device="cpu") > 0  # the path a GPU shares with a CPU


# -- 5. docs that hold on GPU ---------------------------------------------------------------------------------

def test_the_bit_identical_resume_claims_say_what_it_takes_on_gpu():
    for doc, claim in [("README.md", "bit-identical"), ("docs/distributed.md", "bit for bit")]:
        text = " ".join((REPO / doc).read_text().split())
        at = text.index(claim)
        near = text[at - 400:at + 900]
        assert "train.deterministic=true" in near and "CUBLAS_WORKSPACE_CONFIG" in near, doc
        assert "not measured" in near or "not been measured" in near, doc


def test_the_cuda_rng_saved_and_restored_is_that_of_the_ranks_own_device(monkeypatch):
    # A resume may see another number of GPUs per process: only this rank's device's generator is saved.
    from gpt_train.rng import RankRNG

    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or torch.tensor([7]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", device, int(state[0]))))
    rng = RankRNG(seed=1, rank=3, device=torch.device("cuda", 1))
    state = rng.state_dict()
    assert calls == [("get", torch.device("cuda", 1))] and int(state["cuda"][0]) == 7
    rng.load_state_dict(state)
    assert calls[-1] == ("set", torch.device("cuda", 1), 7)
    # a checkpoint from before, holding every visible device's state: this rank takes its own device's
    rng.load_state_dict({**state, "cuda": [torch.tensor([5]), torch.tensor([6])]})
    assert calls[-1] == ("set", torch.device("cuda", 1), 6)
    assert "cuda" in RankRNG(1, 0, torch.device("cpu")).state_dict() and RankRNG(1, 0, torch.device("cpu")).state_dict()["cuda"] is None
