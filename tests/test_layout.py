"""Layout rules: the library never imports Prefect or MLflow; mlflow/ never shadows mlflow."""

from __future__ import annotations

import ast
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_seap_library_imports_neither_prefect_nor_mlflow() -> None:
    offenders = []
    for path in (ROOT / "seap").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("prefect", "mlflow")]
    assert offenders == []


def test_mlflow_folder_has_no_init_and_does_not_shadow_the_package() -> None:
    assert not (ROOT / "mlflow" / "__init__.py").exists()
    import mlflow

    assert hasattr(mlflow, "pyfunc") and "site-packages" in str(Path(mlflow.__file__))


def test_the_installed_project_provides_tasks_and_flows_but_not_mlflow(tmp_path) -> None:
    """Dask schedulers and workers unpickle the flow's tasks: outside a checkout (another working
    folder, no PYTHONPATH) the installed project provides ``seap``, ``tasks`` and ``flows``, and
    ``mlflow`` is still the real package."""
    import json
    import os
    import subprocess
    import sys

    code = ("import importlib.util, json; print(json.dumps({n: getattr(importlib.util.find_spec(n), 'origin', None) "
            "for n in ('seap', 'tasks', 'flows', 'mlflow')}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    origins = json.loads(out.stdout)
    for name in ("seap", "tasks", "flows"):
        assert origins[name] and Path(origins[name]).parent.name == name, origins
    assert "site-packages" in origins["mlflow"], origins


def _seap_imports(path: Path, top_level_only: bool) -> set[str]:
    """The ``seap.*`` modules a file imports (module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("seap"):
            found.add(node.module or "")
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("seap"))
    return found


def _modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "seap").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        out[name] = path
    return out


PROJECT_PACKAGES = ("seap", "flows", "tasks")  # what ``from X import _name`` may not reach into


def _module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The module an ``ImportFrom`` names, relative imports resolved against ``importer``."""
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def import_graph(root: Path = ROOT) -> dict[str, dict[str, str]]:
    """Every ``seap`` module -> the ``seap`` modules it imports -> where (``file:line``), from the
    AST: imports at module level, inside functions and under ``if TYPE_CHECKING`` alike. ``from
    P import n`` is an edge to ``P.n`` when that is a module, else to ``P``."""
    paths = {_module_name(p, root): p for p in (root / "seap").rglob("*.py")}
    graph: dict[str, dict[str, str]] = {}
    for name, path in paths.items():
        edges: dict[str, str] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = _absolute(node, name, path.name == "__init__.py")
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in paths else module for a in node.names]
            for target in targets:
                if target in paths and target != name:
                    edges.setdefault(target, f"{path.relative_to(root)}:{node.lineno}")
        graph[name] = edges
    return graph


def import_cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through each strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    cycles = []
    for group in groups:  # the shortest way from the group's first module back to it (breadth first)
        start = min(group)
        came_from: dict[str, str] = {}
        frontier = [start]
        while start not in came_from:
            following = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w in group and w not in came_from:
                        came_from[w] = v
                        following.append(w)
            frontier = following
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(came_from[path[-1]])
        cycles.append(path[::-1])
    return cycles


def test_the_library_import_graph_has_no_cycle() -> None:
    """Module-level and function-level imports of ``seap.*`` form a DAG: no module needs, even
    lazily, a module that needs it (shared pieces live in a module both import)."""
    graph = import_graph()
    assert graph.get("seap.model.surgery"), "the graph was not built"
    cycles = import_cycles(graph)
    report = ["  " + " -> ".join(f"{a} ({graph[a][b]})" for a, b in pairwise(cycle)) + f" -> {cycle[-1]}"
              for cycle in cycles]
    assert not cycles, "import cycles in seap:\n" + "\n".join(report)


def private_imports(folders: tuple[str, ...] = PROJECT_PACKAGES, root: Path = ROOT) -> list[str]:
    """Where a module takes another project module's private name (``_name``, not ``__dunder__``):
    ``from X import _name``, or ``X._name`` on a name bound to a project module by an import."""
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            me = _module_name(path, root)
            tree = ast.parse(path.read_text(), str(path))
            bound: dict[str, str] = {}  # local name -> the project module (or object of one) it is
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):  # ``import seap.x.y`` binds ``seap``; ``import seap.x as m``, m
                    for a in node.names:
                        if a.name.split(".")[0] in PROJECT_PACKAGES:
                            top = a.name.split(".")[0]
                            bound[a.asname or top] = a.name if a.asname else top
                elif isinstance(node, ast.ImportFrom):
                    module = _absolute(node, me, path.name == "__init__.py")
                    if module.split(".")[0] not in PROJECT_PACKAGES:
                        continue
                    for a in node.names:
                        bound[a.asname or a.name] = f"{module}.{a.name}"
                        if _is_private(a.name) and module != me:
                            found.append(f"{path.relative_to(root)}:{node.lineno}: from {module} import {a.name}")
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and _is_private(node.attr):
                    chain, value = [], node.value
                    while isinstance(value, ast.Attribute):
                        chain.append(value.attr)
                        value = value.value
                    if isinstance(value, ast.Name) and value.id in bound:
                        owner = ".".join([bound[value.id], *reversed(chain)])
                        if owner != me:
                            found.append(f"{path.relative_to(root)}:{node.lineno}: {owner}.{node.attr}")
    return found


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_is_imported_across_modules() -> None:
    """What a module shares is public (and documented); its ``_names`` stay its own."""
    found = private_imports()
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_packages_import_in_the_direction_data_flows() -> None:
    """data -> maths -> model -> evaluation -> registry -> run: no package imports a later one
    at module level (``seap.cli`` sits on top)."""
    order = ["data", "maths", "model", "evaluation", "registry", "run"]
    offenders = []
    for name, path in _modules().items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] not in order:
            continue
        for imported in _seap_imports(path, True):
            other = imported.split(".")
            if len(other) > 1 and other[1] in order and order.index(other[1]) > order.index(parts[1]):
                offenders.append(f"{name} imports {imported}")
    assert offenders == []


def test_no_two_library_modules_share_a_name() -> None:
    stems = [p.stem for p in (ROOT / "seap").rglob("*.py") if p.stem != "__init__"]
    assert sorted(s for s in set(stems) if stems.count(s) > 1) == []
    top_level = {p.name for p in ROOT.iterdir() if p.is_dir()}
    assert not ({p.stem for p in (ROOT / "seap").rglob("*.py")} & top_level - {"mlflow"})  # tasks/, flows/ ...


def test_help_imports_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; from seap.cli import build_parser; p = build_parser(); "
            "[p.parse_known_args([c, '--help']) for c in ()]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"
    for args in (["--help"], ["eval", "--help"], ["prune", "--help"], ["stage", "--help"]):
        code = ("import sys, contextlib, io\nfrom seap.cli import main\n"
                f"with contextlib.redirect_stdout(io.StringIO()):\n    try: main({args!r})\n    except SystemExit: pass\n"
                "print('torch' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
        assert out.stdout.strip() == "False", args


def test_cli_score_and_schedule_names_match_the_engine_tables() -> None:
    from seap.cli import SCHEDULE_NAMES, SCORE_NAMES
    from seap.maths.schedules import SCHEDULES
    from seap.maths.scores import SCORES

    assert set(SCORE_NAMES) == set(SCORES) and set(SCHEDULE_NAMES) == set(SCHEDULES)


def test_library_defaults_agree_with_the_run_configuration() -> None:
    """Where a library function keeps a default for direct callers, it is the configuration's."""
    from seap.data.corpus import DEFAULT_MAX_TOKENS, DEFAULT_SAMPLES_PER_TASK, DEFAULT_SEED
    from seap.evaluation.harness import DEFAULT_EVAL_BATCH_SIZE
    from seap.maths.schedules import DEFAULT_SCHEDULE
    from seap.maths.scores import DEFAULT_SCORE
    from seap.run.config import RunConfig

    c = RunConfig()
    assert (c.evaluate.eval_batch_size, c.masks.score, c.masks.schedule) == \
        (DEFAULT_EVAL_BATCH_SIZE, DEFAULT_SCORE, DEFAULT_SCHEDULE)
    assert (c.data.samples, c.data.seed, c.data.max_tokens) == \
        (DEFAULT_SAMPLES_PER_TASK, DEFAULT_SEED, DEFAULT_MAX_TOKENS)
