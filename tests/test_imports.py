"""The package's import graph has no cycle, counting the imports inside functions (ARCHITECTURE: nothing points up)."""

import ast
import os

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "essa_mpi")


def imports() -> dict:
    """{module: {essa_mpi modules it imports anywhere in its file}}."""
    graph = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            name = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".").removesuffix(".__init__")
            found = set()
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("essa_mpi"):
                    found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
                elif isinstance(node, ast.Import):
                    found |= {a.name for a in node.names if a.name.startswith("essa_mpi")}
            graph[name] = found
    return {m: {d for d in deps if d in graph and d != m and d != "essa_mpi"} for m, deps in graph.items()}


def test_no_import_cycles():
    graph, done, stack = imports(), set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for d in sorted(graph[m]):
            visit(d)
        stack.pop()
        done.add(m)

    assert len(graph) > 25 and "essa_mpi.jsonl" in graph["essa_mpi.plot"] & graph["essa_mpi.metrics"]
    for m in sorted(graph):
        visit(m)


def test_a_rank_starts_without_scikit_learn_which_stays_importable():
    """transformers imports sklearn (and SciPy) whenever installed, for assisted decoding: 0.8 s of every rank's
    start. model.import_transformers hides it for that import only; lm-eval and users can still import it."""
    import subprocess
    import sys

    code = ("import sys; from essa_mpi.model import import_transformers; import_transformers(); "
            "from transformers import AutoModelForCausalLM, GenerationMixin; "
            "print('sklearn' in sys.modules, 'scipy.stats' in sys.modules); import sklearn.metrics; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False", "ok"], out.stderr[-2000:]


def test_exporting_the_adapter_does_not_import_bitsandbytes(tmp_path):
    """peft imports bitsandbytes when installed (0.7 s at the end of every run); a config file needs none of it,
    and a quantized run has imported it already when it loaded the model."""
    import subprocess
    import sys

    code = ("import sys; from tiny import make_model, make_tokenizer; from essa_mpi.export import export_adapter; "
            "from essa_mpi.svd_lora import SVDLoRA, fresh_lora_factors; m = make_model(len(make_tokenizer())); "
            "a = SVDLoRA.attach(m, fresh_lora_factors(m, ['q_proj'], 2, 4.0, 0), 1.0); "
            f"export_adapter(a, [0.0] * a.solution_length, {str(tmp_path)!r}, 4.0); "
            "print('bitsandbytes' in sys.modules); import bitsandbytes; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.stdout.split() == ["False", "ok"], out.stderr[-2000:]
    assert (tmp_path / "adapter_config.json").exists()


def test_a_config_the_run_refuses_stops_before_torch_is_imported():
    """A mistyped key ends `python -m essa_mpi` with its one line before torch and transformers are imported
    (3.6 s -> 0.4 s under mpiexec -n 2). Counted from outside: -X importtime lists every module the process
    imported."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "essa_mpi", "search.popsizee=3"],
                         capture_output=True, text=True, timeout=120)
    lines = [x for x in out.stderr.splitlines() if not x.startswith("import time:")]
    imported = {x.rsplit("|", 1)[-1].strip() for x in out.stderr.splitlines() if x.startswith("import time:")}
    assert out.returncode == 2 and lines == ["essa_mpi: error: unknown config key 'search.popsizee'; did you mean "
                                             "'search.popsize'?"], out.stderr[-2000:]
    assert "essa_mpi.cli" in imported and not {"torch", "transformers"} & imported, sorted(imported)
