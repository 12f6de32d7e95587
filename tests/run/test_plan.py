"""The planner: one configuration in, the jobs every front door runs, with stable keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from seap.errors import SeapError
from seap.run.config import RunConfig, options
from seap.run.methods import BASELINES, DEFAULT_METHODS, METHODS, NEURON_METHODS
from seap.run.plan import STAGES, Job, Plan, check_plan, make_plan

ROOT = Path(__file__).resolve().parents[2]


def walks(plan: Plan) -> list[Job]:
    """The plan's refit walk (``refits/walk``), not the refitted masks linked from it."""
    return [j for j in plan.of_stage("refits") if j.params.member is None]


def refitted(plan: Plan) -> dict[str, Job]:
    """``row/name`` -> the ``refits`` job of every refitted mask."""
    return {j.params.member: j for j in plan.of_stage("refits") if j.params.member is not None}


def test_default_plan_has_todays_rows_and_stable_keys() -> None:
    plan = make_plan(RunConfig())
    assert plan.rows == ["dense", *(f"{m}@{s:g}" for s in (0.2, 0.5) for m in ("seap-expert", "seap-general",
                                                                                 "wanda-sp", "flap")),
                         "seap-routed@0.2", "seap-routed@0.5"]
    keys = [j.key for j in plan.jobs]
    assert len(keys) == len(set(keys)) and keys == [j.key for j in make_plan(RunConfig()).jobs]
    tasks = RunConfig().data.task_names

    def masks_of(s: float) -> list[str]:
        return [*(f"seap-expert@{s:g}/{t}" for t in tasks),
                *(f"{m}@{s:g}/general" for m in ("seap-general", "wanda-sp", "flap"))]

    # the masks built plain, then one walk refitting them all, then each refitted mask
    assert keys == ["model", "corpus", "statistics/tasks", "statistics/pooled",
                    *(f"scores/seap-sf/{t}" for t in tasks), "scores/wanda-sp/pooled", "scores/flap/pooled",
                    *(f"masks/{m}" for s in (0.2, 0.5) for m in masks_of(s)),
                    "refits/walk", *(f"refits/{m}" for s in (0.2, 0.5) for m in masks_of(s)),
                    "evaluate-dense/dense",
                    *(f"evaluate/{m}@{s:g}" for s in (0.2, 0.5) for m in ("seap-expert", "seap-general", "wanda-sp",
                                                                          "flap")),
                    "router", "evaluate-routed/seap-routed@0.2", "evaluate-routed/seap-routed@0.5",
                    "bench", "report", "register"]
    routed = plan.get("evaluate-routed/seap-routed@0.5")
    assert routed.inputs["expert_row"] == "evaluate/seap-expert@0.5"
    assert routed.inputs["general"] == "refits/seap-general@0.5/general"  # the refitted masks are read
    assert routed.inputs["experts"] == {t: f"refits/seap-expert@0.5/{t}" for t in tasks}
    assert plan.get("evaluate/flap@0.5").inputs["masks"] == {"general": "refits/flap@0.5/general"}
    assert plan.mask_groups()["seap-expert@0.2"] == {t: f"refits/seap-expert@0.2/{t}" for t in tasks}
    # registration takes the SEAP masks only; the bench every mask
    assert set(plan.get("register").inputs["masks"]) == {f"{m}@{s}" for m in ("seap-expert", "seap-general")
                                                         for s in ("0.2", "0.5")}
    assert len(plan.get("bench").inputs["masks"]) == 2 * (5 + 1 + 2)


def test_method_entries_decide_calibration_and_bias_compensation() -> None:
    default = make_plan(RunConfig(methods=list(NEURON_METHODS), sparsities=[0.3]))  # the default: every mask refitted
    built = default.of_stage("masks")
    assert all(not j.params.bias_compensation and "bias_statistics" not in j.inputs for j in built)
    assert set(refitted(default)) == {j.name for j in built}
    (walk,) = walks(default)
    assert walk.inputs["masks"] == {j.name: j.key for j in built} and walk.params.refit is not None
    assert set(default.mask_groups()["flap@0.3"].values()) == {"refits/flap@0.3/general"}
    plan = make_plan(RunConfig(methods=list(NEURON_METHODS), sparsities=[0.3], reconstruct=False))
    assert not plan.of_stage("refits")  # nothing refitted: the plain masks are read
    assert set(plan.mask_groups()["flap@0.3"].values()) == {"masks/flap@0.3/general"}
    for name in NEURON_METHODS:
        method = METHODS[name]
        masks = [j for j in plan.of_stage("masks") if j.params.method == name]
        if method.calibration == "routed":
            assert not masks
            continue
        assert all(j.params.bias_compensation == method.bias_compensation for j in masks)
        assert all(("bias_statistics" in j.inputs) == method.bias_compensation for j in masks)
        if method.calibration == "task":
            assert sorted(j.params.mask for j in masks) == sorted(RunConfig().data.task_names)
        else:
            assert [j.params.mask for j in masks] == ["general"]
        if method.calibration == "pooled":
            assert all(j.inputs["scores"] == [f"scores/{method.score}/pooled"] for j in masks)


def test_no_pooled_statistics_without_a_baseline_and_routing_adds_its_masks() -> None:
    plan = make_plan(RunConfig(methods=["seap-routed"], reconstruct=False))
    assert "statistics/pooled" not in [j.key for j in plan.jobs]
    refit = make_plan(RunConfig(methods=["seap-routed"]))  # the general mask is refitted on the pooled text ...
    walk = refit.get("refits/walk")
    assert walk.inputs["masks"]["seap-general@0.2/general"] == "masks/seap-general@0.2/general"
    assert walk.params.tasks["seap-general@0.2/general"] is None and walk.inputs["refit_corpus"] == "corpus"
    assert refit.get("evaluate-routed/seap-routed@0.2").inputs["general"] == "refits/seap-general@0.2/general"
    assert "statistics/pooled" not in [j.key for j in refit.jobs]  # ... streamed, not pooled statistics
    assert {j.params.method for j in plan.of_stage("masks")} == {"seap-expert", "seap-general"}
    assert plan.rows == ["dense", "seap-routed@0.2", "seap-routed@0.5"]
    assert "expert_row" not in plan.get("evaluate-routed/seap-routed@0.2").inputs  # no expert row to reuse
    assert set(BASELINES) == {"wanda-sp", "wanda-sp+logistic", "flap", "flap+logistic", "moe-frequency"}
    assert set(DEFAULT_METHODS) <= set(METHODS)


def test_sharded_statistics_are_merged_by_a_job_of_their_own() -> None:
    plan = make_plan(RunConfig(stats_shards=3))
    shards = [j.key for j in plan.of_stage("statistics") if j.name.startswith("shard-")]
    assert shards == [f"statistics/shard-{i}-of-3" for i in range(3)]
    assert plan.get("statistics/tasks").inputs == {"shards": shards}


def test_upstream_of_keeps_what_a_job_reads() -> None:
    sub = make_plan(RunConfig()).upstream_of(["router"])
    assert [j.key for j in sub.jobs] == ["model", "router"]


def test_check_plan_refuses_unplanned_inputs_and_stages_out_of_order() -> None:
    config = RunConfig()
    with pytest.raises(SeapError, match="not planned before it"):
        check_plan(Plan(config, [Job("scores", "x", {"statistics": "statistics/tasks"})]))
    with pytest.raises(SeapError, match="not upstream of corpus"):
        check_plan(Plan(config, [Job("model"), Job("corpus", "", {"model": "model"})]))
    with pytest.raises(SeapError, match="planned twice"):
        check_plan(Plan(config, [Job("model"), Job("model")]))


def test_every_stage_has_a_function_and_its_modules_exist() -> None:
    from seap.run.stages import STAGE_FUNCTIONS

    assert set(STAGES) == set(STAGE_FUNCTIONS)
    for stage in STAGES.values():
        for module in stage.modules:
            path = ROOT / Path(*module.split("."))
            assert path.is_dir() or path.with_suffix(".py").is_file(), (stage.name, module)
        for option in stage.options:
            assert option in options(), (stage.name, option)


def test_map_inputs_keeps_the_nesting_and_visits_every_reference() -> None:
    from seap.run.plan import input_leaves, map_inputs

    inputs = {"model": "model", "masks": {"geo": "masks/x/geo", "general": None}, "rows": ["evaluate/a", "evaluate/b"]}
    assert {r: map_inputs(v, str.upper) for r, v in inputs.items()} == {
        "model": "MODEL", "masks": {"geo": "MASKS/X/GEO", "general": None}, "rows": ["EVALUATE/A", "EVALUATE/B"]}
    resolved = {"masks": {"geo": {"path": "/w/geo", "digest": "d1"}}, "rows": [{"path": "/w/a", "digest": "d2"}]}
    assert [ref["digest"] for v in resolved.values() for ref in input_leaves(v)] == ["d1", "d2"]
    assert map_inputs(resolved["rows"], lambda ref: ref["path"]) == ["/w/a"]


def test_reconstruction_refits_each_method_on_the_text_it_was_calibrated_on() -> None:
    from seap.run.job_params import StatisticsParams

    plan = make_plan(RunConfig(methods=list(NEURON_METHODS), sparsities=[0.3], reconstruct=True, refit_alpha=0.1,
                               stats_batch_size=5))
    assert "second_moments" not in StatisticsParams.__dataclass_fields__  # no statistics job holds them
    assert [j.key for j in plan.of_stage("statistics")] == ["statistics/tasks", "statistics/pooled"]
    (walk,) = walks(plan)
    # the calibration text itself, streamed through the base layer by layer, in the statistics' batches
    assert walk.inputs["model"] == "model" and walk.inputs["refit_corpus"] == "corpus"
    assert "refit_statistics" not in walk.inputs and "refit_generic" not in walk.inputs
    assert walk.params.refit == {"alpha": 0.1} and walk.params.batch_size == 5
    members = refitted(plan)
    for job in plan.of_stage("masks"):  # built plain: the refit is the walk's
        method = METHODS[job.params.method]
        assert job.params.refit is None and "model" not in job.inputs and "refit_corpus" not in job.inputs
        assert job.params.bias_compensation is False and "bias_statistics" not in job.inputs  # the refit replaces it
        # an expert on its task's text, everything else on every task's
        assert walk.inputs["masks"][job.name] == job.key
        assert walk.params.tasks[job.name] == (job.params.mask if method.calibration == "task" else None)
        assert members[job.name].inputs == {"walk": walk.key} and members[job.name].key == f"refits/{job.name}"
    assert set(members) == set(walk.inputs["masks"]) == set(walk.params.tasks)
    pooled = make_plan(RunConfig(methods=["seap-expert"], reconstruct=True, refit_corpus="pooled"))
    assert "statistics/pooled" not in [j.key for j in pooled.jobs]  # the pooled text needs no pooled statistics
    assert all(set(w.params.tasks.values()) == {None} and w.inputs["refit_corpus"] == "corpus" for w in walks(pooled))
    generic = make_plan(RunConfig(methods=["seap-expert"], reconstruct=True, refit_generic=["boolq"]))
    keys = [j.key for j in generic.jobs]
    assert "corpus/generic" in keys and "statistics/generic" not in keys  # generic text: a corpus, no statistics
    assert generic.get("corpus/generic").params.tasks == ["boolq"]
    assert len(walks(generic)) == 1 and all(w.inputs["refit_generic"] == "corpus/generic" for w in walks(generic))
    assert not any("refit_generic" in j.inputs for j in generic.of_stage("masks"))
    with pytest.raises(SeapError, match="refit options are given, and the refit is switched off"):
        make_plan(RunConfig(refit_generic=["boolq"], reconstruct=False))  # (it would do nothing: refused)
    # without reconstruction nothing changes: the same jobs as before the option existed
    plain = make_plan(RunConfig(reconstruct=False))
    assert not plain.of_stage("refits")
    assert not any(getattr(j.params, "refit", None) or getattr(j.params, "refit_batch_size", None) for j in plain.jobs)
    assert not any("refit_corpus" in j.inputs or "model" in j.inputs for j in plain.of_stage("masks"))
    assert all(k.startswith("masks/") for group in plain.mask_groups().values() for k in group.values())


def test_the_sequential_refit_reads_the_corpus_as_the_one_shot_refit_does() -> None:
    plan = make_plan(RunConfig(methods=["seap-expert", "wanda-sp+logistic"], sparsities=[0.5], reconstruct=True,
                               refit_sequential=True, refit_generic=["boolq"]))
    one_shot = make_plan(RunConfig(methods=["seap-expert", "wanda-sp+logistic"], sparsities=[0.5], reconstruct=True,
                                   refit_generic=["boolq"]))
    assert [j.key for j in plan.of_stage("statistics")] == [j.key for j in one_shot.of_stage("statistics")]
    assert "statistics/generic" not in [j.key for j in plan.jobs] and "corpus/generic" in [j.key for j in plan.jobs]
    # the same plain masks; the same walk (corpus and generic text), with the sequential refit
    assert [(j.key, j.inputs, j.params) for j in plan.of_stage("masks")] == \
        [(j.key, j.inputs, j.params) for j in one_shot.of_stage("masks")]
    (walk,), (other,) = walks(plan), walks(one_shot)
    assert walk.key == other.key == "refits/walk"
    assert walk.inputs["refit_corpus"] == "corpus" and walk.inputs["refit_generic"] == "corpus/generic"
    assert walk.params.refit == {"sequential": True} and "refit_statistics" not in walk.inputs
    assert not other.params.refit.get("sequential")
    assert walk.inputs == other.inputs and walk.params.tasks == other.params.tasks
    assert [j.key for j in plan.of_stage("refits")] == [j.key for j in one_shot.of_stage("refits")]


def test_the_per_task_control_refits_each_baseline_once_per_task() -> None:
    config = RunConfig(methods=["seap-expert", "seap-general", "wanda-sp+logistic"], sparsities=[0.5], reconstruct=True,
                       refit_corpus="per-task")
    plan = make_plan(config)
    masks = {j.key: j for j in plan.of_stage("masks")}
    tasks = config.data.task_names
    (walk,) = walks(plan)
    assert walk.inputs["refit_corpus"] == "corpus"
    baseline = {m: t for m, t in walk.params.tasks.items() if m.startswith("wanda-sp+logistic@0.5/")}
    # the baseline's task-agnostic mask, refitted once on each task's own text
    assert baseline == {f"wanda-sp+logistic@0.5/{t}": t for t in tasks}
    for task in tasks:
        job = masks[f"masks/wanda-sp+logistic@0.5/{task}"]
        assert job.inputs["scores"] == ["scores/wanda-sp/pooled"] and job.params.refit is None
        assert walk.inputs["masks"][job.name] == job.key
    assert walk.params.tasks["seap-general@0.5/general"] is None  # the routing fallback stays task-agnostic
    row = next(j for j in plan.of_stage("evaluate") if j.row == "wanda-sp+logistic@0.5")
    assert row.params.per_task and row.inputs["masks"] == {t: f"refits/wanda-sp+logistic@0.5/{t}" for t in tasks}
    without = make_plan(RunConfig(methods=["wanda-sp+logistic"], sparsities=[0.5], refit_corpus="per-task",
                                  reconstruct=False))
    assert [j.key for j in without.of_stage("masks")] == ["masks/wanda-sp+logistic@0.5/general"]  # no refit: one mask
    assert not without.of_stage("refits")


def test_one_walk_refits_every_mask_of_every_sparsity() -> None:
    plan = make_plan(RunConfig())
    (walk,) = walks(plan)
    assert walk.key == "refits/walk"
    members = refitted(plan)
    built = {j.name: j.key for j in plan.of_stage("masks")}
    assert {j.params.sparsity for j in plan.of_stage("masks")} == set(RunConfig().masks.sparsities)
    assert walk.inputs["masks"] == built and set(walk.params.tasks) == set(built)  # every mask, in one walk
    assert {m for m, j in members.items() if j.inputs == {"walk": walk.key}} == set(built)
    assert all(members[m].params.member == m for m in built)
    assert set(members) == {j.name for j in plan.of_stage("masks")}  # and no mask in two walks

def test_the_bias_compensation_option_overrides_every_method_and_conflicts_with_reconstruction() -> None:
    plan = make_plan(RunConfig(methods=["seap-expert", "flap"], sparsities=[0.3], bias_compensation=True,
                               reconstruct=False))
    assert all(j.params.bias_compensation and "bias_statistics" in j.inputs for j in plan.of_stage("masks"))
    off = make_plan(RunConfig(methods=["flap"], sparsities=[0.3], bias_compensation=False, reconstruct=False))
    assert not any(j.params.bias_compensation for j in off.of_stage("masks"))
    # the one rule for reconstruction's default: on, unless bias compensation (which it replaces) is asked for
    assert RunConfig().reconstruction.reconstruct is True
    assert RunConfig(bias_compensation=True).reconstruction.reconstruct is False
    with pytest.raises(SeapError, match="reconstruction replaces bias compensation") as error:
        RunConfig(bias_compensation=True, reconstruct=True).validate(check_data=False)
    assert "reconstruct=False" in error.value.fix
    with pytest.raises(SeapError, match="refit_prior: unknown value 'banana'"):
        RunConfig(refit_prior="banana").validate(check_data=False)


def test_every_cached_stage_lists_the_modules_its_code_imports() -> None:
    """A stage's cache key hashes its modules' source: a module its function (or a helper it
    calls) imports but the stage table leaves out would let a code change reuse stale outputs."""
    import ast
    import inspect

    import seap.run.stages as stages

    tree = ast.parse(inspect.getsource(stages))
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}

    def imported(fn: ast.FunctionDef, seen: set[str]) -> set[str]:
        out = set()
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("seap."):
                out.add(node.module)
            if isinstance(node, ast.Name) and node.id in functions and node.id not in seen:
                seen.add(node.id)
                out |= imported(functions[node.id], seen)
        return out

    for name, function in stages.STAGE_FUNCTIONS.items():
        if STAGES[name].cached:
            missing = imported(functions[function.__name__], {function.__name__}) - set(STAGES[name].modules)
            assert not missing, f"stage {name} imports {sorted(missing)} but does not list them"
