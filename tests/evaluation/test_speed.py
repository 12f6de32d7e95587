import json

from seap.evaluation.speed import benchmark
from seap.cli import main
from seap.model.masking import apply_mask
from tests.helpers import make_tiny_model
from tests.model.test_surgery import mask_for


def test_benchmark_reports_both_models_and_ratios() -> None:
    loaded = make_tiny_model("llama-gqa")
    pruned = apply_mask(loaded, mask_for(loaded, 0.5), "hard")
    result = benchmark({"dense": loaded, "pruned": pruned}, prefill_batch_size=2, prefill_tokens=16, decode_tokens=4,
                       repeats=2, warmup=0)
    dense, p = result["models"]["dense"], result["models"]["pruned"]
    assert dense["prefill_speedup"] == 1.0 and dense["decode_speedup"] == 1.0
    assert len(p["prefill_seconds"]) == 2 and p["prefill_tokens_per_s"] > 0 and p["decode_tokens_per_s"] > 0
    assert p["prunable_params"] < dense["prunable_params"] and p["realised_sparsity"] > 0
    assert result["setup"]["statistic"] == "median"


def test_bench_cli_writes_json(tmp_path, capsys) -> None:
    loaded = make_tiny_model("llama-gqa")
    loaded.model.save_pretrained(tmp_path / "base")
    loaded.tokenizer.save_pretrained(tmp_path / "base")
    mask_for(loaded, 0.5).save(tmp_path / "mask")
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", str(tmp_path / "base"), "--mask", str(tmp_path / "mask"), "--prefill-batch", "2",
                 "--prefill-tokens", "16", "--decode-tokens", "4", "--repeats", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["models"]) == {"dense", f"mask:{tmp_path / 'mask'}"}
    assert "prefill" in capsys.readouterr().out
    assert main(["bench", "--model", str(tmp_path / "base"), "--out", str(tmp_path / "x.json")]) == 2


def test_report_shows_llama_cpp_figures_or_why_they_are_missing() -> None:
    from seap.evaluation.report import speed_section

    torch_row = {"realised_sparsity": 0.5, "params": 10, "bytes": 40, "prefill_tokens_per_s": 100.0,
                 "prefill_speedup": 1.5, "decode_tokens_per_s": 10.0, "decode_speedup": 1.2}
    setup = {"prefill": "p", "decode": "d", "repeats": 3, "device": "cpu", "torch_threads": 2}
    engine = {"models": {"dense": {"bytes": 2**20, "prefill_tokens_per_s": 1000.0, "prefill_speedup": 1.0,
                                   "decode_tokens_per_s": 100.0, "decode_speedup": 1.0}},
              "setup": {"engine": "llama.cpp 0c1e570", "format": "GGUF float16", "tool": "llama-bench", "prefill": "p",
                        "decode": "d", "repetitions": 3, "threads": 2}}
    text = "\n".join(speed_section({"models": {"dense": torch_row}, "setup": setup, "llama_cpp": engine}))
    assert "In llama.cpp (llama.cpp 0c1e570" in text and "| dense | 1.0 | 1000 | 1.00 | 100.0 | 1.00 |" in text
    skipped = "\n".join(speed_section({"models": {"dense": torch_row}, "setup": setup,
                                       "llama_cpp": {"skipped": "no llama.cpp build found"}}))
    assert "llama.cpp: no llama.cpp build found." in skipped


def test_bench_cli_names_the_missing_llama_cpp_build(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SEAP_LLAMA_CPP", str(tmp_path / "nowhere"))
    assert main(["bench", "--model", str(tmp_path / "m"), "--pruned", "x", "--llama-cpp", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert "no llama.cpp build found" in err and "build_llama_cpp.sh" in err
