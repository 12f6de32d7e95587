import json

from seap.evaluation.speed import benchmark
from seap.cli import main
from seap.model.surgery import apply_mask
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
