"""The shape of the code: no import cycles, no module importing a script, no sys.path edits,
and every DeepSpeed-internal name behind ppllm/ds_compat.py."""
from __future__ import annotations

import ast
import os
import re

import pytest

from tests.helpers import REPO

PACKAGES = ("models", "data", "ppllm")
SCRIPTS = ("train_pp", "convert_model")
# DeepSpeed attributes that are not public API; only ppllm/ds_compat.py may touch them
DS_PRIVATE = ("_take_model_step", "_partition_layers", "_layer_specs", "_set_bounds", "tied_modules",
              "tied_weight_attrs", "_local_start", "_local_stop", "forward_funcs", "_synchronize_tied_weights",
              "ds_pipe_replicated", "model_parallel", "partition_balanced", "partition_uniform", "_topo",
              "PipeDataParallelTopology")


def project_files() -> dict[str, str]:
    """module name -> path, for the packages, the two scripts, tests, bench and scripts/."""
    out = {}
    for top in PACKAGES + ("tests", "bench", "scripts"):
        for name in sorted(os.listdir(os.path.join(REPO, top))):
            if name.endswith(".py"):
                mod = f"{top}.{name[:-3]}" if name != "__init__.py" else top
                out[mod] = os.path.join(REPO, top, name)
    for s in SCRIPTS:
        out[s] = os.path.join(REPO, f"{s}.py")
    return out


def imports_of(path: str, module: str, top_level_only: bool) -> set[str]:
    """Project modules a file imports (relative imports resolved)."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def graph(top_level_only: bool) -> dict[str, set[str]]:
    files = project_files()
    return {m: {i for i in imports_of(p, m, top_level_only) if i in files and i != m} for m, p in files.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if state.get(n) is None and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None
    for m in sorted(g):
        if state.get(m) is None and (c := visit(m)):
            return c
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_between_modules():
    cycle = find_cycle(graph(top_level_only=True))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_imports_a_script():
    offenders = [f"{m} imports {s}" for m, deps in graph(top_level_only=False).items() for s in SCRIPTS if s in deps]
    assert not offenders, offenders
    assert "ppllm.train" in graph(False)["train_pp"] or "ppllm" in imports_of(
        os.path.join(REPO, "train_pp.py"), "train_pp", False)


@pytest.mark.parametrize("script,limit", [("train_pp.py", 60), ("convert_model.py", 60)])
def test_scripts_are_thin_doors(script, limit):
    lines = [line for line in open(os.path.join(REPO, script)) if line.strip()]
    assert len(lines) <= limit, f"{script} has {len(lines)} non-blank lines; the work belongs in the package"


def test_no_sys_path_edits():
    bad = [p for p in project_files().values() if re.search(r"sys\.path\.(insert|append)", open(p).read())]
    assert not bad, bad


def test_deepspeed_internals_only_in_ds_compat():
    allowed = os.path.join(REPO, "ppllm", "ds_compat.py")
    names = "|".join(DS_PRIVATE)
    pattern = re.compile(rf"\.({names})\b|\bimport\b.*\b({names})\b")
    offenders = []
    for mod, path in project_files().items():
        if path == allowed or not mod.split(".")[0] in PACKAGES + SCRIPTS:
            continue
        for n, line in enumerate(open(path), 1):
            if pattern.search(line) or re.search(r"deepspeed\.runtime", line):
                offenders.append(f"{os.path.relpath(path, REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_deepspeed_version_range_is_checked():
    from ppllm import ds_compat
    ds_compat.check_version("0.19.8")
    ds_compat.check_version("0.19.10+abc")
    for bad in ("0.18.9", "0.20.0", "1.0.0"):
        with pytest.raises(ImportError, match=r"DeepSpeed >=0\.19\.0,<0\.20\.0.*found " + re.escape(bad)):
            ds_compat.check_version(bad)


# collectives ppllm issues itself; only ppllm/collectives.py may call them (it places their tensors
# on the device the backend serves: NCCL rejects host tensors)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather",
               "gather_object", "scatter", "scatter_object_list", "all_to_all", "all_to_all_single", "barrier",
               "monitored_barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv")


def collective_calls(path: str) -> list[str]:
    """``<anything>.<collective>(`` calls through torch.distributed / deepspeed.comm, or a bare
    name imported from them, in one file."""
    tree = ast.parse(open(path).read(), path)
    imported = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith(("torch.distributed", "deepspeed.comm"))
                for a in node.names if a.name in COLLECTIVES}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES:
            base = ast.unparse(f.value)
            if base in ("dist", "torch.distributed", "deepspeed.comm", "ds_comm", "c10d") or base.endswith(
                    "distributed"):
                found.append(f"{path}:{node.lineno}: {ast.unparse(f)}")
        elif isinstance(f, ast.Name) and f.id in imported:
            found.append(f"{path}:{node.lineno}: {f.id}")
    return found


def test_collective_calls_finds_them(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import torch\nimport torch.distributed as dist\nfrom torch.distributed import barrier\n"
                   "dist.all_reduce(t)\ntorch.distributed.broadcast_object_list(x, 0)\nbarrier()\n"
                   "dist.get_rank()\nengine.all_reduce(t)\n")
    assert [line.split(": ")[1] for line in collective_calls(str(src))] == [
        "dist.all_reduce", "torch.distributed.broadcast_object_list", "barrier"]


def test_collectives_only_in_the_control_plane():
    allowed = os.path.join(REPO, "ppllm", "collectives.py")
    offenders = [hit for mod, path in project_files().items()
                 if mod.split(".")[0] in PACKAGES + SCRIPTS and path != allowed for hit in collective_calls(path)]
    assert not offenders, ("collectives outside ppllm/collectives.py (NCCL needs their tensors on the current "
                           "device; call ppllm.collectives instead):\n" + "\n".join(offenders))
