"""The served routed bundle under a bounded load (scripts/load_test_serving.py): `mlflow models
serve` on loopback, concurrent clients, no 5xx, memory flat, and every malformed request a 4xx
with a message."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.services, pytest.mark.slow]


def test_the_served_routed_bundle_holds_a_bounded_load_and_refuses_bad_requests(llama_pipeline, tmp_path,
                                                                               monkeypatch) -> None:
    root, _, state = llama_pipeline
    assert state.is_completed()
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{__import__('os').environ['PATH']}")
    import load_test_serving

    out = tmp_path / "load.json"
    code = load_test_serving.main(["--model-uri", "models:/seap-base-routed/1", "--tracking-uri",
                                   f"sqlite:///{root / 'mlflow' / 'mlflow.db'}", "--requests", "24", "--clients", "3",
                                   "--max-new-tokens", "2", "--max-growth", "0.25", "--log", str(tmp_path / "serve.log"),
                                   "--out", str(out)])
    report = json.loads(out.read_text())
    assert code == 0, report["problems"]
    assert report["status"] == {"200": 24} and report["host"] == "127.0.0.1"
    assert set(report["malformed"]) >= {"not JSON", "no prompts", "an empty prompt", "an over-long prompt",
                                        "an unknown task"}
    for name, answer in report["malformed"].items():
        assert 400 <= answer["status"] < 500 and answer["message"], name
    assert "astrology" in report["malformed"]["an unknown task"]["message"]
