"""Shared fixtures: tiny random models built in code (no hub, no downloads)."""

from __future__ import annotations

import os

# One torch thread, here and in every process a test starts (DVC stages, flows, servers inherit the
# variable): the models are tiny, and on a 2-core machine shared with servers and subprocesses torch's
# OpenMP pool of two threads spins against the other work (tests/model/test_calibration.py took 81 s
# with two threads beside one busy process, 4 s with one). Set OMP_NUM_THREADS to run with more.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests use their own servers and local stores
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

from tests.helpers import ARCHS, make_tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEAP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "seap-cache"))


@pytest.fixture
def all_cores():
    """Every core for torch while a test runs on a real checkpoint (100M+ parameters), where its
    threads pay off; the rest of the suite runs on one (see above)."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=ARCHS)
def tiny(request: pytest.FixtureRequest):
    """A LoadedModel for each tiny architecture (Llama MHA, Llama GQA, Qwen2, Mistral)."""
    return make_tiny_model(request.param)


@pytest.fixture(scope="session")
def prefect_env(tmp_path_factory: pytest.TempPathFactory):
    """One temporary Prefect server for the whole session (the real engine), state in tmp."""
    root = tmp_path_factory.mktemp("prefect")
    env = {"PREFECT_HOME": str(root / "home"), "PREFECT_LOCAL_STORAGE_PATH": str(root / "results"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def llama_pipeline(prefect_env, tmp_path_factory: pytest.TempPathFactory):
    """One complete run of the Prefect pipeline flow on the tiny Llama (router, bench, registry and
    the embedded MLflow store included), shared by the flow tests, the front-door comparison with
    `dvc repro` and `seap eval`, and the MLflow server tests (which reuse its work folder at other
    sparsities, never 0.3: tests/flows/test_pipeline.py changes to 0.3 and expects it unbuilt).
    Returns (root folder, flow parameters, final state)."""
    from flows.pipeline import seap_pipeline
    from tests.helpers_flows import pipeline_kwargs

    root = tmp_path_factory.mktemp("pipeline")
    kwargs = pipeline_kwargs(root)
    return root, kwargs, seap_pipeline(return_state=True, **kwargs)
