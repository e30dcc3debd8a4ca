"""launch: the launcher's process count against MPI's world, and which GPUs a rank owns (faked GPU counts)."""

import os
from types import SimpleNamespace

import pytest
import torch

from essa_mpi.config import ModelConfig
from essa_mpi.launch import check_world, expected_world, gpu_ids, placement, srun_mpi_plugin


@pytest.mark.parametrize("env,world,bad", [
    ({}, 1, False),  # python -m essa_mpi without a launcher
    ({"SLURM_STEP_NUM_TASKS": "2"}, 2, False),
    ({"SLURM_STEP_NUM_TASKS": "2"}, 1, True),  # srun --mpi=none
    ({"SLURM_STEP_NUM_TASKS": "4", "PMIX_RANK": "0"}, 1, True),  # srun --mpi=pmix, MPICH without PMIx
    ({"PMI_SIZE": "3"}, 1, True),  # a PMI launcher whose MPI ignored PMI
    ({"OMPI_COMM_WORLD_SIZE": "8"}, 8, False),
    ({"OMPI_COMM_WORLD_SIZE": "8"}, 1, True),
    ({"SLURM_STEP_NUM_TASKS": "1", "PMI_SIZE": "2"}, 2, False),  # mpiexec inside a one-task srun step
    ({"SLURM_NTASKS": "8"}, 1, False),  # a plain python inside an sbatch script (no srun step): allowed
    ({"SLURM_STEP_NUM_TASKS": "x"}, 1, False),
])
def test_check_world(env, world, bad):
    if bad:
        with pytest.raises(ValueError, match=r"started \d+ processes .* worlds of 1.*--mpi=pmi2"):
            check_world(env, world, "MPICH Version: 5.0.2\nMPICH Release date: ...")
    else:
        check_world(env, world)


def test_expected_world_prefers_the_innermost_launcher():
    assert expected_world({"SLURM_STEP_NUM_TASKS": "16", "OMPI_COMM_WORLD_SIZE": "4"}) == (4, "OMPI_COMM_WORLD_SIZE")


def test_srun_plugin_follows_the_library():
    assert srun_mpi_plugin("Open MPI v5.0.3") == "pmix"
    assert srun_mpi_plugin("MPICH Version: 4.2.0") == srun_mpi_plugin("Intel(R) MPI Library 2021.11") == "pmi2"


@pytest.mark.parametrize("local_rank,local_size,g,visible,expected", [
    (0, 8, 1, 8, [0]), (7, 8, 1, 8, [7]), (1, 4, 2, 8, [2, 3]), (1, 2, 4, 8, [4, 5, 6, 7]),
    (3, 4, 2, 2, [0, 1]),  # SLURM --gpus-per-task=2: each task sees its own two GPUs
    (0, 1, 8, 8, list(range(8))),
])
def test_gpu_ids(local_rank, local_size, g, visible, expected):
    assert gpu_ids(local_rank, local_size, g, visible) == expected


def test_gpu_ids_refuses_more_than_the_node_has():
    with pytest.raises(ValueError, match="4 ranks on this node x model.gpus_per_rank=4 need 16 GPUs but this process "
                                         "sees 8"):
        gpu_ids(0, 4, 4, 8)


@pytest.fixture
def eight_gpus(monkeypatch):
    """torch.cuda as on an 8-GPU node (nothing is allocated: placement only decides)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=(80 + i) << 30))


def test_placement_one_gpu_per_rank(eight_gpus):
    device, spread = placement(ModelConfig(), local_rank=5, local_size=8)
    assert device == torch.device("cuda", 5) and spread is None


def test_placement_spreads_a_rank_over_its_gpus(eight_gpus):
    device, spread = placement(ModelConfig(gpus_per_rank=4), local_rank=1, local_size=2)
    assert device == torch.device("cuda", 4) and spread == {i: (80 + i) << 30 for i in (4, 5, 6, 7)}


def test_placement_errors_before_loading(eight_gpus):
    from essa_mpi.cli import check_placement
    from essa_mpi.config import Config

    cfg = Config()
    cfg.model.gpus_per_rank = 2
    with pytest.raises(ValueError, match="8 ranks on this node x model.gpus_per_rank=2 need 16 GPUs"):
        check_placement(cfg, SimpleNamespace(local_rank=0, local_size=8, size=8))


def test_placement_cpu_ignores_gpus(eight_gpus):
    assert placement(ModelConfig(device="cpu", gpus_per_rank=64), 0, 8) == (torch.device("cpu"), None)


def test_cuda_without_cuda_is_refused_before_loading(monkeypatch):
    from essa_mpi.cli import check_placement
    from essa_mpi.config import Config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = Config()
    cfg.model.device = "cuda"
    with pytest.raises(ValueError, match="model.device=cuda but CUDA is not available"):
        check_placement(cfg, SimpleNamespace(local_rank=0, local_size=1, size=1))


def test_old_entry_points_still_work():
    """python -m essa_mpi.comm and tools/quantize_gptq.py became commands of python -m essa_mpi; the old ones stay."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    new = subprocess.run([sys.executable, "-m", "essa_mpi", "launch-check", "--srun-mpi"], capture_output=True,
                         text=True)
    old = subprocess.run([sys.executable, "-m", "essa_mpi.comm", "--srun-mpi"], capture_output=True, text=True)
    assert new.returncode == old.returncode == 0 and new.stdout == old.stdout and new.stdout.strip() in ("pmi2", "pmix")
    res = subprocess.run([sys.executable, os.path.join(root, "tools", "quantize_gptq.py"), "--help"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and "python -m essa_mpi quantize" in res.stdout


def test_threads_come_from_the_affinity_mask_not_the_core_count(monkeypatch):
    """A rank bound to 4 of a node's 64 cores runs 4 threads; 8 unbound ranks sharing 16 cores run 2 each."""
    from essa_mpi import comm as comm_mod
    from essa_mpi.comm import Comm

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {8, 9, 10, 11})
    c = Comm()  # a one-rank world: its node holds only this rank
    assert c.threads == 4 and c.node_leader == 0
    assert comm_mod.threads_per_rank({0, 1, 2, 3}, [{0, 1, 2, 3}, {4, 5, 6, 7}]) == 4
    assert comm_mod.threads_per_rank(set(range(16)), [set(range(16))] * 8) == 2


def test_first_contact_script_dry_run_skips_every_check_with_a_reason(tmp_path):
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "fc.json"
    res = subprocess.run([sys.executable, os.path.join(root, "tools", "bench", "gpu_first_contact.py"), "--out",
                          str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    checks = json.loads(out.read_text())["checks"]
    assert set(checks) == {"cuda_reads_visible_devices_once", "ranks_on_own_gpus", "gptq_cuda",
                           "bf16_left_padded_generation", "hf_vs_vllm"}
    assert all(c["status"] == "skipped" and c["reason"] == "no CUDA device on this machine" for c in checks.values())


def test_one_gpu_loads_straight_onto_it(eight_gpus, monkeypatch, tiny_dir):
    """from_pretrained gets a device_map for one GPU as for several: no copy of the weights in host RAM first."""
    import transformers

    from essa_mpi.model import load_model

    seen = {}

    def from_pretrained(path, **kw):
        seen.update(kw)
        raise RuntimeError("stop")

    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(RuntimeError, match="stop"):
        load_model(ModelConfig(name_or_path=tiny_dir, device="cuda"), local_rank=3, local_size=8)
    assert seen["device_map"] == {"": torch.device("cuda", 3)}


def test_a_signal_during_start_up_ends_the_rank_with_one_line(tmp_path):
    """SIGTERM while the rank is still importing torch/transformers: one line and exit 143, no traceback."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "essa_mpi", f"run.output_dir={tmp_path}/run"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 10
    while time.time() < deadline:  # until __main__ has set its handler (SigCgt bit 15); the imports take longer
        caught = next((int(line.split()[1], 16) for line in open(f"/proc/{proc.pid}/status")
                       if line.startswith("SigCgt:")), 0)
        if caught & (1 << (signal.SIGTERM - 1)):
            break
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip() == "essa_mpi: stopped by SIGTERM while starting; nothing was written."
