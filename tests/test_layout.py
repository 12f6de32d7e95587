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
