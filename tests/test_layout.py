"""Layout rules: the library never imports Prefect or MLflow; mlflow/ never shadows mlflow."""

from __future__ import annotations

import ast
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


def test_no_import_cycles_between_library_modules() -> None:
    """Module-level imports form a DAG: data types apart from procedures, packages in data-flow order."""
    modules = _modules()
    graph = {name: {m for m in _seap_imports(path, True) if m in modules and m != name and m != "seap"}
             for name, path in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name)


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
    assert (c.eval_batch_size, c.score, c.schedule) == (DEFAULT_EVAL_BATCH_SIZE, DEFAULT_SCORE, DEFAULT_SCHEDULE)
    assert (c.samples, c.seed, c.max_tokens) == (DEFAULT_SAMPLES_PER_TASK, DEFAULT_SEED, DEFAULT_MAX_TOKENS)
