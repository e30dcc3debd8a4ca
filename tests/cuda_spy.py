"""A fake CUDA driver at the ``torch.cuda`` boundary and a stand-in vLLM, for GPU placement tests on a CPU.

    python tests/cuda_spy.py OUT.json CASES.json    # runs ``python -m essa_mpi`` once per simulated local rank

A real driver reads CUDA_VISIBLE_DEVICES once, at the first call that initialises CUDA (``is_available``,
``device_count``, ``set_device``, ...); changing the variable later changes nothing in that process, but the
processes it spawns (vLLM's tensor-parallel workers) read it afresh. ``FakeDriver`` does the same: its first
call freezes the visible GPUs, and every later device index maps through that frozen list to a physical GPU.
What each simulated rank reports: the variable when CUDA started, the calls before that, and the physical
GPUs its model, its current device (where a reward model goes) and its vLLM engine would use. Each rank runs
``cli.main`` in this process up to the model's first placement, where ``Reached`` stops it.

CASES.json: [{"gpus": 8, "local_size": 8, "launcher": "hydra" | "srun" | "ompi" | "real", "args": [...],
"preset": CUDA_VISIBLE_DEVICES the launcher set ("{rank}" is the local rank) or absent}, ...]; "real" runs one
rank per process under a real ``mpiexec`` (OUT.json may hold "{rank}").
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import types

import torch

LAUNCHERS = {  # local rank, local size -> the launcher's environment
    "hydra": lambda r, n: {"MPI_LOCALRANKID": str(r), "MPI_LOCALNRANKS": str(n)},
    "srun": lambda r, n: {"SLURM_LOCALID": str(r), "SLURM_STEP_TASKS_PER_NODE": f"{n}(x2)", "SLURM_NODEID": "1"},
    "ompi": lambda r, n: {"OMPI_COMM_WORLD_LOCAL_RANK": str(r), "OMPI_COMM_WORLD_LOCAL_SIZE": str(n)},
}
CLEARED = ("CUDA_VISIBLE_DEVICES", "ESSA_GPU_SLOT", "VLLM_PORT", *{k for f in LAUNCHERS.values() for k in f(0, 1)})


class Reached(BaseException):
    """The rank got as far as placing its model: stop it (not an Exception, so main's handlers let it through)."""


class FakeDriver:
    def __init__(self, gpus: int) -> None:
        self.gpus, self.visible, self.calls, self.env_at_init, self.current = gpus, None, [], None, 0

    def init(self, name: str) -> list:
        self.calls.append((name, os.environ.get("CUDA_VISIBLE_DEVICES")))
        if self.visible is None:  # the driver reads the variable once
            self.env_at_init = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = self.env_at_init.split(",") if self.env_at_init is not None else range(self.gpus)
            self.visible = [int(i) for i in ids if str(i).strip()]
            self.current = 0
        return self.visible

    def physical(self, index) -> int:
        index = torch.device(index).index if not isinstance(index, int) else index
        return self.init("physical")[index or 0]


NOW: dict = {}  # the simulated rank's driver and record


def install() -> None:
    """torch.cuda, Module.to, from_pretrained and vllm as a node with NOW["driver"].gpus GPUs would answer them."""
    cuda = torch.cuda

    class Current:  # the patched functions find the simulated rank's driver and record here
        def __getattr__(self, name):
            return getattr(NOW["driver"], name)

    driver = Current()

    class Record:
        def __setitem__(self, key, value):
            NOW["record"][key] = value

    record = Record()

    def set_device(d):
        driver.init("set_device")
        NOW["driver"].current = torch.device(d).index if not isinstance(d, int) else d

    cuda.is_available = lambda: bool(driver.init("is_available"))
    cuda.device_count = lambda: len(driver.init("device_count"))
    cuda.is_initialized = lambda: driver.visible is not None
    cuda.current_device = lambda: (driver.init("current_device"), driver.current)[1]
    cuda.set_device = set_device
    cuda.get_device_properties = lambda i: (driver.init("get_device_properties"),
                                            types.SimpleNamespace(total_memory=80 << 30, name="Fake"))[1]
    cuda.mem_get_info = lambda i=None: (driver.init("mem_get_info"), (80 << 30, 80 << 30))[1]

    real_to = torch.nn.Module.to

    def module_to(self, *args, **kwargs):
        device = args[0] if args else kwargs.get("device")
        if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
            record["model_gpus"] = [driver.physical(torch.device(device).index or 0)]
            record["current_gpu"] = driver.physical(driver.current)
            raise Reached
        return real_to(self, *args, **kwargs)

    torch.nn.Module.to = module_to

    import transformers

    real_from = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(path, *args, **kwargs):
        if kwargs.get("max_memory"):  # one rank over several GPUs: accelerate's map over these devices
            record["model_gpus"] = [driver.physical(i) for i in kwargs["max_memory"]]
        elif isinstance(kwargs.get("device_map"), dict):  # straight onto one GPU
            record["model_gpus"] = [driver.physical(torch.device(d).index or 0) for d in kwargs["device_map"].values()]
        else:
            return real_from(path, *args, **kwargs)
        record["current_gpu"] = driver.physical(driver.current)
        raise Reached

    transformers.AutoModelForCausalLM.from_pretrained = from_pretrained
    sys.modules["vllm"] = fake_vllm(driver, record)


def fake_vllm(driver: FakeDriver, record: dict) -> types.ModuleType:
    """vllm.LLM as vLLM 0.32 places itself: in this process on device 0 of what the driver froze (tp = 1), or
    in spawned workers that read CUDA_VISIBLE_DEVICES when they start (tp > 1)."""
    class LLM:
        def __init__(self, **kw):
            tp = kw["tensor_parallel_size"]
            if tp == 1:
                record["model_gpus"] = [driver.physical(0)]
            else:
                env = os.environ.get("CUDA_VISIBLE_DEVICES")
                record["model_gpus"] = [int(i) for i in env.split(",")[:tp]] if env else list(range(tp))
            record["current_gpu"] = driver.physical(driver.current)
            record["vllm"] = {"tp": tp, "generation_config": kw.get("generation_config"),
                              "spawn": os.environ.get("VLLM_WORKER_MULTIPROC_METHOD"),
                              "port": os.environ.get("VLLM_PORT")}
            raise Reached

    mod = types.ModuleType("vllm")
    mod.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    mod.LLM, mod.SamplingParams = LLM, lambda **kw: kw
    return mod


def run_case(case: dict) -> list:
    """Every local rank of one case, in turn, each with a fresh driver → what each saw."""
    from essa_mpi import cli, launch

    out = []
    real = case["launcher"] == "real"  # under a real mpiexec: one rank, the launcher's own environment
    for r in [int(os.environ["MPI_LOCALRANKID"])] if real else range(case["local_size"]):
        if not real:
            for key in CLEARED:
                os.environ.pop(key, None)
            os.environ.update(LAUNCHERS[case["launcher"]](r, case["local_size"]))
        if case.get("preset") is not None:  # the launcher's own binding (SLURM --gpus-per-task, a job's GPUs)
            os.environ["CUDA_VISIBLE_DEVICES"] = case["preset"].format(rank=r)
        driver, record = FakeDriver(case["gpus"]), {"local_rank": r}
        held = sys.modules["vllm"]
        if case.get("no_vllm"):  # vLLM not installed (or broken): its import raises
            sys.modules["vllm"] = None
        NOW.update(driver=driver, record=record)
        launch.node_gpus = cli.node_gpus = lambda: case["gpus"]
        args = [a.replace("{rank}", str(r)) for a in case["args"]]
        sys.argv = ["essa_mpi", *args]
        try:
            record["exit"] = cli.main()
        except Reached:
            record["exit"] = "reached"
        sys.modules["vllm"] = held
        record.update(env_at_init=driver.env_at_init, first_call=driver.calls[0] if driver.calls else None)
        out.append(record)
    return out


def main() -> int:
    out, cases = sys.argv[1], json.load(open(sys.argv[2]))
    import peft  # noqa: F401 - imported by the SFT after binding; its import probes CUDA kernels this fake lacks
    install()
    results = [run_case(c) for c in cases]
    out = out.replace("{rank}", os.environ.get("PMI_RANK", "0"))
    with open(out, "w") as fh:
        json.dump(results, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
