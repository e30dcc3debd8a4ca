"""stage.py: hub names resolved once for the job; the model's files read once per node (counted by strace)."""

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
from test_cli_mpi import ENV, HERE, launch, tiny_args

from essa_mpi import stage

REPO = os.path.dirname(HERE)
OPENAT = re.compile(r'^\d+\s+openat\(AT_FDCWD, "([^"]+)", [^)]*\) = (\d+)')


def test_model_files_are_what_the_loaders_read(tmp_path):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "pytorch_model.bin", "x.png"):
        (tmp_path / name).write_text("x")
    (tmp_path / "original").mkdir()
    assert stage.model_files(str(tmp_path), None) == ["config.json", "model.safetensors", "tokenizer.json"]
    (tmp_path / "model.safetensors").unlink()  # no safetensors: the .bin weights are the weights
    assert stage.model_files(str(tmp_path), None) == ["config.json", "tokenizer.json", "pytorch_model.bin"]
    assert stage.model_files(str(tmp_path), "m.gguf") == ["m.gguf"]


def test_a_whole_copy_is_reused_and_a_changed_source_copied_again(tmp_path):
    src, dest = tmp_path / "src", str(tmp_path / "dest")
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"w" * 1000)
    assert stage.copy_model(str(src), None, dest)[0] == 1002
    assert stage.copy_model(str(src), None, dest)[0] == 0  # a requeued job: the node's copy is whole
    (src / "model.safetensors").write_bytes(b"v" * 10)
    assert stage.copy_model(str(src), None, dest)[0] == 12
    assert (tmp_path / "dest" / "model.safetensors").read_bytes() == b"v" * 10
    assert sorted(os.listdir(tmp_path)) == ["dest", "src"]  # no temp directory left


def test_too_little_space_reads_in_place_with_one_line(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"w" * 5000)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: collections.namedtuple("u", "total used free")(0, 0, 100))
    local, copied, _, note = stage.stage_node({"model.name_or_path": (str(src), None)}, str(tmp_path), "n", True)
    assert local == {} and copied == 0
    assert note.startswith(f"run.stage_dir={tmp_path}: the model files need 0.0 GiB") and "shared path" in note


def test_a_copy_that_fails_midway_leaves_nothing_and_reads_in_place(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"w" * 100)
    real = shutil.copyfile

    def full_disk(a, b):
        if a.endswith(".safetensors"):
            raise OSError(28, "No space left on device", b)
        return real(a, b)

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    local, _, _, note = stage.stage_node({"model.name_or_path": (str(src), None)}, str(tmp_path / "stage"), "n",
                                         True)
    assert local == {} and "could not copy" in note and "No space left on device" in note
    assert os.listdir(tmp_path / "stage" / "n") == []  # no half copy


def hub_site(tmp_path, repos: dict):
    """A sitecustomize that replaces huggingface_hub.snapshot_download in every rank: each call appends a line
    to calls.log (counted here, outside the ranks), known repos answer a local directory, others fail as the
    offline hub does on a cache miss."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import os, huggingface_hub
        def fake(repo_id, revision=None, **kw):
            with open({str(tmp_path / 'calls.log')!r}, "a") as fh:
                fh.write(f"{{os.getpid()}} {{repo_id}} {{revision}}\\n")
            if repo_id not in {repos!r}:
                raise huggingface_hub.errors.LocalEntryNotFoundError(
                    "Cannot find an appropriate cached snapshot folder for the specified revision on the local "
                    "disk and outgoing traffic has been disabled.")
            return {repos!r}[repo_id]
        huggingface_hub.snapshot_download = fake
    """))
    return {**ENV, "PYTHONPATH": f"{site}{os.pathsep}{ENV['PYTHONPATH']}"}


def calls(tmp_path) -> list:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_a_hub_name_is_resolved_once_for_every_rank(tiny_dir, tmp_path):
    env = hub_site(tmp_path, {"org/tiny": str(tiny_dir)})
    args = [a.replace(f"model.name_or_path={tiny_dir}", "model.name_or_path=org/tiny") for a in
            tiny_args(tiny_dir, tmp_path / "run", 1)] + ["model.revision=v1"]
    res = subprocess.run(launch(4, args), capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(calls(tmp_path)) == 1 and calls(tmp_path)[0].endswith(" org/tiny v1"), calls(tmp_path)


def test_a_hub_name_that_does_not_resolve_is_one_line_from_rank_0(tiny_dir, tmp_path):
    env = hub_site(tmp_path, {})
    args = [a.replace(f"model.name_or_path={tiny_dir}", "model.name_or_path=org/missing") for a in
            tiny_args(tiny_dir, tmp_path / "run", 1)]
    res = subprocess.run(launch(2, args), capture_output=True, text=True, timeout=300, env=env)
    lines = [x for x in res.stderr.splitlines() if "error" in x]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith("essa_mpi: error: model.name_or_path='org/missing': could not resolve it on the "
                               "Hugging Face hub (LocalEntryNotFoundError: Cannot find"), lines
    assert len(calls(tmp_path)) == 1


@pytest.mark.skipif(shutil.which("srun") is None or shutil.which("strace") is None,
                    reason="needs SLURM (tools/slurm_local.sh up --nodes 2) and strace")
def test_each_model_and_data_file_is_opened_by_one_rank_per_node(tiny_dir, tmp_path):
    """srun -n 4 over 2 simulated nodes, every rank under strace: which ranks open each file under the model
    and data directories (from the system calls: safetensors and tokenizers open files from Rust)."""
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "prompts.jsonl", "w") as fh:
        for i in range(12):
            fh.write(json.dumps({"prompt": f"Say {i}:"}) + "\n")
    out, traces, scratch = tmp_path / "run", tmp_path / "traces", tmp_path / "scratch"
    traces.mkdir()
    scratch.mkdir()
    args = [a for a in tiny_args(tiny_dir, out, 1) if not a.startswith("task.")] + [
        "task.name=custom", f"task.dataset={data / 'prompts.jsonl'}", "task.reward_fn=mpi_rewards:constant",
        "task.batch_size=3", "task.val_size=4", "task.max_new_tokens=4"]
    rank = " ".join([sys.executable, "-m", "essa_mpi", *map(str, args)])
    script = f"exec strace -f -qq --seccomp-bpf -e trace=openat -o {traces}/rank$SLURM_PROCID {rank}"
    res = subprocess.run(["srun", "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--mpi=pmi2", "--label",
                          "bash", "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**ENV, "TMPDIR": str(scratch)})
    assert res.returncode == 0, res.stderr[-3000:]
    with open(out / "summary.json") as fh:
        hosts = json.load(fh)["hosts"]  # [rank]: its node
    assert len(set(hosts)) == 2
    opened = collections.defaultdict(set)  # file -> ranks that opened it
    for r in range(4):
        for line in (traces / f"rank{r}").read_text().splitlines():
            m = OPENAT.match(line)
            if m and m[1].startswith((str(tiny_dir), str(data))):
                opened[os.path.normpath(m[1])].add(r)
    expected = {os.path.join(tiny_dir, n) for n in stage.model_files(str(tiny_dir), None)} | {
        str(data / "prompts.jsonl")}
    assert expected <= set(opened), sorted(opened)  # each was read (by someone)
    twice = {f: sorted(rs) for f, rs in opened.items() if max(collections.Counter(hosts[r] for r in rs).values()) > 1}
    assert not twice, f"opened by more than one rank of a node: {twice} (ranks' nodes {hosts})"
    assert "model files staged once per node" in res.stdout + res.stderr
    assert not [n for n in os.listdir(scratch) if n.startswith("essa_mpi-")], os.listdir(scratch)  # removed at exit


def test_two_runs_on_one_host_stage_to_directories_of_their_own(tiny_dir, tmp_path, monkeypatch):
    """Outside SLURM (run.stage_dir given) the directory carries the leader's pid: another run on the host
    neither reuses nor removes it. One-rank world, in process."""
    from essa_mpi import modelfiles
    from essa_mpi.comm import Comm
    from essa_mpi.config import load_config

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(modelfiles, "LOCAL", {})
    cfg = load_config(None, [f"model.name_or_path={tiny_dir}", f"run.stage_dir={tmp_path}", "run.keep_stage=true"])
    notes = stage.localize(cfg, Comm())
    path, gguf = modelfiles.resolve(cfg.model)
    assert os.path.basename(os.path.dirname(path)).startswith(f"essa_mpi-pid{os.getpid()}-") and gguf is None
    assert os.path.isfile(os.path.join(path, "config.json")) and "staged once per node" in notes[-1]
