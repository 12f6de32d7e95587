"""The work folder's cache kept honest and bounded: a corrupt entry is rebuilt, not trusted; a
run under a size cap stays under it; ``seap cache`` lists and prunes, keeping what the newest
run needs."""

from __future__ import annotations

import json

import pytest

from seap.cli import main
from seap.run.cache_entries import entries, folder_size, parse_age, parse_size, record_path
from seap.run.execute import execute
from seap.run.plan import make_plan
from tests.run.test_execute import tiny_config


def _work_bytes(config) -> int:
    return sum(e.bytes for e in entries(config.outputs.workdir))


def test_sizes_and_ages_are_read_as_people_write_them() -> None:
    assert parse_size("20G") == 20 * 1024**3 and parse_size("1.5M") == int(1.5 * 1024**2) and parse_size("512") == 512
    assert parse_age("7d") == 7 * 86400 and parse_age("12h") == 12 * 3600
    for bad in ("twenty", "-1G", "5Q"):
        with pytest.raises(Exception, match="cannot read the size"):
            parse_size(bad)


def test_a_corrupt_cache_entry_is_rebuilt_not_trusted(tmp_path) -> None:
    config = tiny_config(tmp_path, methods=["seap-expert"], mlflow=False, bench=False)
    first = execute(make_plan(config))
    scores = first.path("scores/seap-sf/geo")
    files = sorted(p for p in scores.rglob("*") if p.is_file())
    original = {p: p.read_bytes() for p in files}
    assert record_path(scores).is_file()  # (written with the entry: its digest, size and job)
    damaged = files[0]
    damaged.write_bytes(damaged.read_bytes()[:-8] + b"\x00" * 8)  # a bit flip, a torn write: same size
    said: list[str] = []
    from seap.run.stages import StageContext

    again = execute(make_plan(config), StageContext(tmp_path / "work" / "task-files", say=said.append))
    assert "scores/seap-sf/geo" not in again.cached and "scores/seap-sf/life" in again.cached
    assert any("corrupt" in s and "scores/seap-sf/geo" in s for s in said)
    assert {p: p.read_bytes() for p in files} == original  # rebuilt to what was written
    assert again.outputs["scores/seap-sf/geo"]["digest"] == first.outputs["scores/seap-sf/geo"]["digest"]
    assert "masks/seap-expert@0.3/geo" in again.cached  # (same content, so what follows is reused)


def test_a_run_under_a_size_cap_stays_under_it(tmp_path) -> None:
    """A second run in a capped work folder (another sparsity: new masks, refits and rows) evicts
    the first run's least recently used outputs as it goes, and never holds more than the cap
    between jobs; its results are those of an uncapped run."""
    methods = ["seap-expert", "seap-general", "wanda-sp"]
    first = tiny_config(tmp_path, methods=methods, sparsities=[0.5], bench=False, mlflow=False)
    execute(make_plan(first))
    cap = int(_work_bytes(first) * 1.1)
    second = first.replace(sparsities=[0.3], cache_max_size=str(cap))
    sizes: list[int] = []

    def between_jobs(event) -> None:
        if event.state == "running":
            sizes.append(_work_bytes(second))

    done = execute(make_plan(second), on_event=between_jobs)
    sizes.append(_work_bytes(second))
    assert max(sizes) <= cap, (sizes, cap)
    uncapped = tiny_config(tmp_path / "free", methods=methods, sparsities=[0.3], bench=False, mlflow=False)
    reference = execute(make_plan(uncapped))
    results = json.loads((done.path("report") / "results.json").read_text())  # the run's results stay
    expected = json.loads((reference.path("report") / "results.json").read_text())
    assert [r["average"] for r in results["rows"]] == [r["average"] for r in expected["rows"]]


def test_seap_cache_lists_and_prunes_keeping_the_newest_run(tmp_path, capsys) -> None:
    old = tiny_config(tmp_path, methods=["seap-expert"], sparsities=[0.5], bench=False, mlflow=False)
    execute(make_plan(old))
    newest = old.replace(sparsities=[0.3])
    execute(make_plan(newest))
    work = str(tmp_path / "work")
    assert main(["cache", "--workdir", work]) == 0
    listed = capsys.readouterr().out
    assert "masks" in listed and "statistics" in listed and "newest run" in listed
    assert main(["cache", "--workdir", work, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)["entries"]
    shared = [e for e in listing if e["entry"].startswith("statistics/")]
    assert shared and all(len(e["runs"]) == 2 and e["newest_run"] for e in shared)  # both runs read the statistics
    assert main(["cache", "prune", "--workdir", work, "--max-size", "1", "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out
    before = {e.rel for e in entries(work)}
    assert main(["cache", "prune", "--workdir", work, "--max-size", "1"]) == 0
    out = capsys.readouterr().out
    left = {e.rel for e in entries(work)}
    assert left < before and "newest run's outputs keep it above" in out
    assert not [p for p in (tmp_path / "work").rglob(".*.entry.json") if not (p.parent / p.name[1:-11]).exists()]
    again = execute(make_plan(newest))
    assert set(again.cached) >= {k for k in again.outputs if k not in ("model", "register")}  # nothing rebuilt
    assert main(["cache", "prune", "--workdir", work]) == 2  # no limit given
    assert "needs a limit" in capsys.readouterr().err
    assert folder_size(tmp_path / "work") > 0


def test_the_space_estimate_reads_the_model_size_and_every_row_key(tmp_path) -> None:
    from types import SimpleNamespace

    from seap.run.cache_entries import REFIT_SHARE, estimate_run_bytes, model_parameters
    from tests.helpers import make_tiny_model

    tiny = make_tiny_model("llama-gqa")
    tiny.model.save_pretrained(tmp_path / "m")
    params = model_parameters(str(tmp_path / "m"))
    assert params is not None and params > 0
    jobs = [SimpleNamespace(stage="refits", name=name, key=f"refits/{name}")
            for name in ("walk", "seap-expert@0.2/geo", "seap-expert@0.5:life")]  # (both key spellings)
    estimate = estimate_run_bytes(jobs, str(tmp_path / "m"), "float32")
    assert estimate == int(REFIT_SHARE * params * 4 * (0.8 + 0.5) + params * 4 * 0.05)
    assert estimate_run_bytes(jobs, "org/not-fetched", "float32") is None
