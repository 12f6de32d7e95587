"""The quality study on a tiny model: selection on held-out train items, every compensation,
paired tests, KL, the written report; and the pure significance functions it uses."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from seap.errors import SeapError
from seap.run.study import (NO_COMPENSATION, Compensation, StudyOptions, decode_correctness, encode_correctness,
                             refit_candidates, run_study, selection_data, study_markdown)
from tests.helpers_flows import tiny_project


def test_selection_data_holds_out_train_items_and_never_touches_evaluation_items(tmp_path) -> None:
    _, data = tiny_project(tmp_path)
    options = StudyOptions(data_dir=str(data), tasks=("geo", "life"), workdir=str(tmp_path / "work"))
    names = selection_data(options.config(), tmp_path / "sel", items=10, seed=1)
    assert names == ["jsonl:geo", "jsonl:life"]
    for task in ("geo", "life"):
        canon = lambda lines: sorted(json.dumps(json.loads(x), sort_keys=True) for x in lines)  # noqa: E731
        train = canon((data / task / "train.jsonl").read_text().splitlines())
        cut = [(tmp_path / "sel" / task / f"{s}.jsonl").read_text().splitlines() for s in ("train", "validation")]
        assert len(cut[1]) == 10 and canon(cut[0] + cut[1]) == train  # the train split, cut in two


@pytest.mark.slow
def test_the_study_runs_end_to_end_and_reports_every_comparison(tmp_path) -> None:
    base, data = tiny_project(tmp_path)
    refit = Compensation("ls", "least squares", {"reconstruct": True, "refit_alpha": 0.1})
    options = StudyOptions(model=str(base), data_dir=str(data), tasks=("geo", "life"), sparsities=(0.3,),
                           selection_sparsities=(0.3,), selection_items=8, calibration_sizes=(10, 20),
                           calibration_size_sparsities=(0.3,), samples=20, limit=8, kl_texts=4, perplexity=False,
                           workdir=str(tmp_path / "work"), out=str(tmp_path / "docs"), candidates=[refit],
                           base={"schedule": "uniform", "router_prompts": 20})
    record = run_study(options, say=lambda _: None)
    assert record["chosen"]["name"] == "ls" and set(record["selection"]["scores"]) == {"none", "bias", "ls"}
    assert record["compensations"] == ["ls", "control-per-task", "none", "bias"]  # the chosen refit and its control first
    control = record["selection"]["control"]  # on the held-out items too: baselines refitted pooled, then per task
    assert {(c["baselines_refit"], c["baseline"]) for c in control} == {
        (r, b) for r in ("pooled", "per-task") for b in ("wanda-sp+logistic", "flap+logistic")}
    assert all(c["low"] <= c["difference"] <= c["high"] for c in control)
    rows = {(r["run"], r["row"]) for r in record["rows"]}
    assert ("ls", "dense") in rows and ("none", "seap-expert@0.3") in rows and ("ls", "seap-expert@0.3") in rows and ("bias", "flap+logistic@0.3") in rows
    for r in record["rows"]:
        low, high = r["headline_ci95"]
        assert low <= r["headline"] <= high
        if r["row"] != "dense" and r["method"] != "seap-routed":
            assert r["kl"]["mean"] >= 0
    # calibration size: 10 records measured; 20 (the rows' own size) is the rows' SEAP expert, not measured again
    sizes = {(r["run"], r["row"]): r["headline"] for r in record["calibration_sizes"]}
    assert ("samples-10-none", "seap-expert@0.3") in sizes
    assert sizes[("samples-20-none", "seap-expert@0.3")] == next(
        r["headline"] for r in record["rows"] if (r["run"], r["row"]) == ("none", "seap-expert@0.3"))
    assert sizes[("samples-20-ls", "seap-expert@0.3")] == next(
        r["headline"] for r in record["rows"] if (r["run"], r["row"]) == ("ls", "seap-expert@0.3"))
    paired = {(p["run"], p["baseline"]) for p in record["paired"]}
    assert ("ls", "wanda-sp+logistic") in paired and ("none", "flap") in paired
    assert ("control-per-task", "flap+logistic") in paired  # the expert against baselines refitted per task
    assert {p["verdict"] for p in record["paired"]} <= {"ahead", "behind", "level"}
    written = tmp_path / "docs" / "results"
    assert json.loads((written / "study.json").read_text())["targets"]
    assert json.loads((written / "study-selection.json").read_text())["selection"]["chosen"] == "ls"
    assert "### Targets" in (written / "study.md").read_text() and "Control on the same items" in (written / "study.md").read_text()
    assert (written / "study-retention.png").read_bytes()[:4] == b"\x89PNG"
    # the tables are a function of the JSON alone: regenerated from it, they read the same
    assert study_markdown(json.loads((written / "study.json").read_text())) == (written / "study.md").read_text()
    assert not (tmp_path / "work" / "register").exists() and not (tmp_path / "registry").exists()  # nothing deployed
    # a second run reuses every job and gives the same numbers
    again = run_study(options, say=lambda _: None)
    assert [r["headline"] for r in again["rows"]] == [r["headline"] for r in record["rows"]]
    # on another machine (no work folder), the ledger of finished runs gives every number without running a job
    ledger = sorted(p.name for p in (written / "study-runs").glob("*.json"))
    assert any(n.startswith("selection-ls-") for n in ledger) and any(n.startswith("control-per-task-") for n in ledger)
    assert any(n.startswith("samples-10-") for n in ledger) and not any(n.startswith("samples-20-") for n in ledger)
    elsewhere = replace(options, workdir=str(tmp_path / "elsewhere" / "work"))
    said: list[str] = []
    moved = run_study(elsewhere, say=said.append)
    assert [(r["row"], r["headline"], r["kl"]) for r in moved["rows"]] == \
        [(r["row"], r["headline"], r["kl"]) for r in record["rows"]]
    assert json.dumps(moved["paired"]) == json.dumps(record["paired"]) and moved["ledger"]["reused"] == moved["ledger"]["runs"]
    assert not (tmp_path / "elsewhere" / "work" / "evaluate").exists() and any("from the ledger" in s for s in said)
    # a changed setting is measured, not read: the entry is matched on everything the numbers depend on
    changed = run_study(replace(elsewhere, kl_texts=3), say=lambda _: None)
    assert changed["ledger"]["reused"] < changed["ledger"]["runs"]


def test_per_item_correctness_round_trips_through_the_ledger_encoding() -> None:
    for values in ({0: 1.0, 1: 0.0, 2: 1.0}, {3: 0.0, 7: 1.0}, {0: 0.5, 1: 1.0}, {}):
        encoded = encode_correctness(values)
        assert decode_correctness(json.loads(json.dumps(encoded))) == values
    assert encode_correctness({0: 1.0, 1: 0.0}) == {"values": "10"}  # compact when ids are 0..n-1
    with pytest.raises(SeapError, match="do not match"):
        decode_correctness({"values": "101", "ids": [0, 1]})


def test_too_few_train_records_to_hold_out_is_a_clear_error(tmp_path) -> None:
    folder = tmp_path / "data" / "tiny"
    folder.mkdir(parents=True)
    record = json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0})
    (folder / "train.jsonl").write_text(record + "\n")
    (folder / "validation.jsonl").write_text(record + "\n")
    options = StudyOptions(data_dir=str(tmp_path / "data"), tasks=("tiny",), workdir=str(tmp_path / "work"))
    with pytest.raises(SeapError, match="too few to hold some out"):
        selection_data(options.config(), tmp_path / "sel", items=10, seed=0)
    assert NO_COMPENSATION.changes == {"reconstruct": False, "bias_compensation": False}  # whatever the defaults


def test_the_candidates_cover_regularisation_bias_corpus_prior_and_generic_text(tmp_path) -> None:
    names = [c.name for c in refit_candidates((0.001, 0.01, 0.1), ("boolq",))]  # one factor at a time
    assert names == ["ls-a0.01-bias-own", "ls-a0.001-bias-own", "ls-a0.1-bias-own", "ls-a0.01-own",
                     "ls-a0.01-bias-pooled", "ls-a0.01-bias-own-zero", "ls-a0.01-bias-own-boolq"]
    generic = refit_candidates((0.01,), ("boolq",))[-1]
    assert generic.changes["refit_generic"] == ["boolq"] and generic.changes["refit_prior"] == "slice"
    assert refit_candidates((0.01,), (), sequential=True)[-1].changes["refit_sequential"] is True
    _, data = tiny_project(tmp_path)  # generic text is copied whole into the selection data folder
    options = StudyOptions(data_dir=str(data), tasks=("geo",), workdir=str(tmp_path / "work"))
    selection_data(options.config(), tmp_path / "sel", items=5, seed=1, generic=["life"])
    assert (tmp_path / "sel" / "life" / "train.jsonl").read_text() == (data / "life" / "train.jsonl").read_text()
    with pytest.raises(SeapError, match="generic refit text 'nope'"):
        selection_data(options.config(), tmp_path / "sel", items=5, seed=1, generic=["nope"])


def test_ledger_entries_survive_options_added_later_but_not_a_changed_setting(tmp_path) -> None:
    from seap.run.study import StudyOptions, ledger_material

    options = StudyOptions(data_dir=str(tmp_path), workdir=str(tmp_path / "w"))
    material = ledger_material(options.config(), 10)
    # an entry written before unit, router_kind, ... and the width options existed lacks those keys
    assert not {"unit", "router_kind", "allow_k_reduction", "expert_score", "channel_multiple", "same_width"} & set(material)
    assert material == ledger_material(options.config(unit="auto", channel_multiple=1), 10)
    assert material != ledger_material(options.config(channel_multiple=64), 10)  # the product's default widths
    assert material != ledger_material(options.config(channel_multiple=None), 10)
    assert material != ledger_material(options.config(same_width=True), 10)
