"""The seam between the run side and the training side, checked on the package's own import graph.

Run side: what a camera box or a Triton client needs (geometry, scoring, engines, stream, ...).
Training side: data sets, training, evaluation, reports, benchmarking, export and calibration.
The run side never imports the training side, at module level or inside a function; only the
PyTorch reference engine may import the model definition (it *is* the model).
"""

import ast
from pathlib import Path

import stfpm_edge

PKG = Path(stfpm_edge.__file__).parent
RUN_SIDE = ("geometry", "scoring", "drift", "timing", "fileio", "errors", "onnxmeta", "render", "engines", "stream", "serve")
TRAINING_SIDE = ("datasets", "store", "train", "evaluate", "metrics", "thresholds", "report", "bench", "demo", "synthetic",
                 "config", "calib", "export", "cli")
MODEL = ("model", "backbones", "checkpoint", "retired")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in the file, relative or absolute)."""
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        name = module_name(path)
        is_pkg = path.name == "__init__.py"
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level + 1] if node.level > 1 else here
                    target = ".".join(base + ([node.module] if node.module else []))
                    candidates = [target] + [f"{target}.{a.name}" for a in node.names]
                elif node.module and node.module.startswith("stfpm_edge"):
                    target = node.module[len("stfpm_edge"):].lstrip(".")
                    candidates = [target] + [f"{target}.{a.name}" for a in node.names]
                else:
                    continue
                deps.update(c.strip(".") for c in candidates if c.strip("."))
            elif isinstance(node, ast.Import):
                deps.update(a.name[len("stfpm_edge."):] for a in node.names if a.name.startswith("stfpm_edge."))
        known = {module_name(p) for p in PKG.rglob("*.py")}
        graph[name] = {d for d in deps if d in known and d != name}
    return graph


def _top(name: str) -> str:
    return name.split(".")[0]


def test_run_side_never_imports_the_training_side():
    graph = import_graph()
    bad = []
    for mod, deps in graph.items():
        if _top(mod) not in RUN_SIDE:
            continue
        for d in deps:
            if _top(d) in TRAINING_SIDE:
                bad.append(f"{mod} -> {d}")
            if _top(d) in MODEL and mod != "engines.torch_engine":
                bad.append(f"{mod} -> {d}")
    assert not bad, "run side imports the training side: " + ", ".join(sorted(bad))


def test_graph_sees_real_edges():
    """The checker is not vacuous: it finds edges we know exist."""
    graph = import_graph()
    assert "geometry" in graph["engines.base"]
    assert "datasets" in graph["train"] and "scoring" in graph["stream.pipeline"]
    assert "checkpoint" in graph["engines.torch_engine"]
    assert all(_top(m) in RUN_SIDE + TRAINING_SIDE + MODEL + ("", "__main__") for m in graph), sorted(graph)
