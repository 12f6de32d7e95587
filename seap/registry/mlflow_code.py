"""Loading the MLflow side of the product (``mlflow/`` in the repository) by path.

The ``seap`` library never imports MLflow. The registry code lives in ``mlflow/``, a
folder without ``__init__.py`` so that it never shadows the installed ``mlflow`` package;
the CLI, the Prefect tasks and the DVC stage load it through :func:`mlflow_registry`.
``SEAP_MLFLOW_DIR`` points at another copy of that folder.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from seap.errors import SeapError

MODULE_NAME = "seap_mlflow_registry"


def mlflow_dir() -> Path:
    """The folder holding ``seap_registry.py``, ``seap_model.py`` and ``promotion.yaml``."""
    return Path(os.environ.get("SEAP_MLFLOW_DIR") or Path(__file__).resolve().parents[2] / "mlflow")


def mlflow_registry() -> ModuleType:
    """The ``mlflow/seap_registry.py`` module (loaded once per process)."""
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    path = mlflow_dir() / "seap_registry.py"
    if not path.is_file():
        raise SeapError(f"the MLflow integration is not at {path}",
                        "run seap from a checkout of its repository, or set SEAP_MLFLOW_DIR to its mlflow/ folder")
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(MODULE_NAME, None)
        raise
    return module


__all__ = ["mlflow_dir", "mlflow_registry"]
