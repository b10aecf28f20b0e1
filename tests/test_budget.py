"""Budget search (hydra/sweeper=budget): the algorithm over a metric oracle, the input checks, and one real
search on yolov5n / coco-val128 through the CLI, checked through MLflow."""

from __future__ import annotations

import json
import math

import pytest
from helpers import CONF, make_cfg, run_cli, runs, store_uri

from sweep import contract
from sweep.budget.plan import combinations, dense_groups
from sweep.budget.search import DENSE_FAILED, FOUND, BudgetSearch, Probe, Result, run_rounds
from sweep.config.schema import ConfigError


# -- the algorithm, over an oracle -----------------------------------------------------------------------------
def search(curve, n=1, keep=0.95, tol=0.01, hi=0.99, dense=1.0, combos=("a",)):
    """Run the search on ``curve(sparsity) -> metric`` (None: the point fails); (answers, rounds, probes)."""
    searches = {k: BudgetSearch(keep, tol, hi) for k in combos}
    seen: list[list[Probe]] = []

    def evaluate(probes):
        seen.append(probes)
        return [Result(dense) if p.dense else Result(curve(p.sparsity), "broke") for p in probes]

    rounds = run_rounds(searches, {"g": list(combos)}, n, evaluate)
    return {k: s.answer() for k, s in searches.items()}, rounds, seen


@pytest.mark.parametrize("threshold", [0.013, 0.2236, 0.5, 0.777, 0.981])
def test_a_monotone_curve_gives_the_true_threshold_within_tol(threshold):
    # a smooth decreasing curve crossing 0.95 x dense exactly at `threshold`
    curve = lambda s: 1.0 - 0.05 * (s / threshold) ** 2  # noqa: E731
    answers, _, probes = search(curve)
    a = answers["a"]
    assert a.status == FOUND and not a.non_monotone
    lo, hi = a.bracket
    assert lo <= threshold and (hi is None or threshold < hi)
    assert a.sparsity == lo and (hi is None or math.isclose(hi - lo, 0.01))
    assert a.retention >= 0.95 and math.isclose(a.value, curve(lo))
    evaluated = {p.sparsity for r in probes for p in r if not p.dense}
    assert lo in evaluated or lo == 0 and hi in evaluated  # never a point that was not evaluated
    # every point is a multiple of tol (a grid sweep's point), at most hi
    assert all(abs(s * 100 - round(s * 100)) < 1e-9 and s <= 0.99 for s in evaluated)
    assert a.points == len(evaluated) + 1 <= 1 + math.ceil(math.log2(100))


def test_k_section_with_three_points_per_round_needs_fewer_rounds_for_the_same_answer():
    curve = lambda s: 1.0 - s  # noqa: E731  passes up to 0.05
    (one, r1, p1), (three, r3, p3) = search(curve, n=1), search(curve, n=3)
    assert one["a"].bracket == three["a"].bracket == (0.05, 0.06)
    assert r3 < r1
    assert all(len([p for p in r if not p.dense]) <= 3 for r in p3)  # n points per open bracket and round
    assert all(len([p for p in r if not p.dense]) == 1 for r in p1)  # sequential: plain bisection


def test_a_non_monotone_curve_reports_the_honest_bracket_below_the_first_failure():
    # passes up to 0.20, fails in (0.20, 0.30], passes again in (0.30, 0.60]: round 1 of the 3-section
    # evaluates 0.25 (fail), 0.50 (pass) and 0.75 (fail)
    curve = lambda s: 1.0 if s <= 0.20 or 0.30 < s <= 0.60 else 0.5  # noqa: E731
    answers, _, probes = search(curve, n=3)
    a = answers["a"]
    assert a.status == FOUND and a.non_monotone
    assert [p.sparsity for p in probes[0] if not p.dense] == [0.25, 0.5, 0.75]
    assert a.sparsity == 0.20 and a.bracket == (0.20, 0.21)
    assert "non-monotone: 0.5 passed above the failure at 0.21" in a.reason
    evaluated = {p.sparsity for r in probes for p in r if not p.dense}
    assert {0.20, 0.21, 0.5} <= evaluated


def test_a_failed_dense_point_gives_no_answer_and_stops_the_search():
    searches = {k: BudgetSearch(0.95, 0.01, 0.99) for k in ("a", "b")}
    calls = []

    def evaluate(probes):
        calls.append(probes)
        return [Result(None, "weights broken") if p.dense else Result(0.3) for p in probes]

    rounds = run_rounds(searches, {"g": ["a", "b"]}, 1, evaluate)
    assert rounds == 1 and sum(p.dense for p in calls[0]) == 1  # one dense reference for the group
    for s in searches.values():
        a = s.answer()
        assert (a.status, a.sparsity, a.bracket) == (DENSE_FAILED, None, None) and "weights broken" in a.reason
        assert a.points == 2  # the reference and round 1's point, evaluated alongside it
    zero = BudgetSearch(0.95, 0.01, 0.99)
    zero.set_dense(0.0)
    assert zero.answer().status == DENSE_FAILED and zero.propose(1) == []


def test_nothing_failing_up_to_hi_and_nothing_passing_are_said_so():
    answers, _, _ = search(lambda s: 1.0, tol=0.1, hi=0.5)
    a = answers["a"]
    assert (a.sparsity, a.bracket) == (0.5, (0.5, None)) and "no failure up to 0.5" in a.reason
    answers, _, _ = search(lambda s: 0.1, tol=0.1, hi=0.5)
    a = answers["a"]
    assert (a.sparsity, a.bracket, a.retention) == (0.0, (0.0, 0.1), 1.0) and "no pruned point passed" in a.reason


def test_a_point_that_fails_to_evaluate_stops_its_search_with_the_bracket_so_far():
    answers, _, _ = search(lambda s: None if s < 0.3 else 0.1, n=1)
    a = answers["a"]
    assert a.status == "error" and "failed: broke" in a.reason and a.bracket == (0.0, 0.5) and a.points == 3


def test_combinations_share_a_dense_reference_unless_another_axis_differs():
    # pruning and recovery axes share the reference (its hash ignores them), the model axis does not
    combos = combinations({}, ["model=yolov5n,yolov5s", "prune=l1_unstructured,global_l1", "recover=none,bn"])
    assert len(combos) == 8 and len(dense_groups(combos)) == 2
    assert combos[0].point(0.25)[-1] == "sparsity=0.25"
    bn = combinations({}, ["recover=bn", "prune.fused=false", "recover.images=8"])[0]
    assert bn.dense() == ["prune.fused=False", "recover.images=8", "recover=none", "sparsity=0"]
    with pytest.raises(ConfigError, match="budget sweeper searches the sparsity"):
        combinations({"sparsity": "0.1,0.2"}, ["model=yolov5n"])


def test_a_job_is_judged_by_the_outcome_json_it_wrote(tmp_path):
    """The sweeper reads each job's metric from its outcome.json: done or skipped alike, a failed job's reason,
    a missing file or metric said so; a task that raised stops the sweep as with the basic sweeper."""
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from hydra_plugins.budget_sweeper._impl import point_result

    def job(name, outcome=None, status=JobStatus.COMPLETED, value=None):
        out = tmp_path / name
        if outcome is not None:
            outcome.save(out)
        hydra_cfg = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(out)}}})
        return JobReturn(hydra_cfg=hydra_cfg, status=status, _return_value=value)

    assert point_result(job("0", contract.Outcome("done", "a", metrics={"mAP50": 0.4})), "mAP50") == Result(0.4, "")
    assert point_result(job("1", contract.Outcome("skipped", "a", metrics={"mAP50": 1})), "mAP50") == Result(1.0, "")
    assert point_result(job("2", contract.Outcome("failed", "a", reason="out of memory")), "mAP50") == \
        Result(None, "out of memory")
    assert point_result(job("3", contract.Outcome("done", "a", metrics={"mAP50": 0.4})), "mAP75") == \
        Result(None, "mAP75 missing")
    assert point_result(job("4"), "mAP50") == Result(None, f"no outcome.json in {tmp_path / '4'}")
    with pytest.raises(RuntimeError, match="task broke"):
        point_result(job("5", status=JobStatus.FAILED, value=RuntimeError("task broke")), "mAP50")


# -- input checks, in process (as the sweep callback runs them before the parent run) ---------------------------
def check(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    from sweep.config.schema import register_configs
    from sweep.track.callbacks import check_sweep

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/sweeper=budget", f"paths.outputs={tmp_path}", *overrides],
                      return_hydra_config=True)
        return check_sweep(cfg)


@pytest.mark.parametrize("overrides,message", [
    (("budget.keep=0",), "budget.keep=0.0 is invalid: allowed is a fraction of the dense metric in (0, 1]"),
    (("budget.keep=1.5",), "budget.keep=1.5 is invalid"),
    (("budget.tol=0",), "budget.tol=0.0 is invalid: allowed is a step in (0, budget.hi=0.99)"),
    (("budget.tol=0.5", "budget.hi=0.4"), "budget.tol=0.5 is invalid"),
    (("budget.hi=1.0",), "budget.hi=1.0 is invalid: allowed is the highest sparsity to search, in (0, 1)"),
    (("budget.metric=mAP99",), "budget.metric='mAP99' is unknown: allowed are mAP50-95, mAP50, mAP75"),
    (("sparsity=0.3",), "sparsity=0.3 is given, but the budget sweeper searches the sparsity"),
    (("+experiment=sensitivity",), "the budget sweeper searches the sparsity"),
    (("prune.method=magic",), "prune.method='magic' is unknown"),
])
def test_bad_budget_input_is_one_clear_message(tmp_path, overrides, message):
    problems = check(tmp_path, "model=yolov5n", *overrides)
    assert len(problems) == 1 and message in next(iter(problems))


def test_a_search_without_a_possible_dense_point_is_refused(tmp_path, assets):
    """A config that pins recovery (not through the recover group) leaves no dense reference to compare with."""
    exp = tmp_path / "conf" / "experiment"
    exp.mkdir(parents=True)
    (exp / "pinned_bn.yaml").write_text("# @package _global_\nprune:\n  fused: false\nrecover:\n  method: bn\n")
    problems = check(tmp_path, "model=yolov5n", "data=coco-val128", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                     "+experiment=pinned_bn")
    [message] = problems
    assert message.startswith("budget search: no dense point possible for combination 0")
    assert "recover.method='bn' is set by the config" in message


def test_a_good_search_passes_the_checks(tmp_path, assets):
    assert check(tmp_path, "model=yolov5n", "data=coco-val128", "prune=global_l1", "budget.metric=mAP50",
                 "budget.tol=0.05") == {}


def test_a_search_whose_inputs_are_missing_says_so_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_CACHE", str(tmp_path / "empty"))
    [message] = check(tmp_path, "model=yolov5n", "data=coco-val128", "prune=global_l1")
    assert "yolov5n.pt is missing" in message and "coco-val128" in message


def test_the_budget_node_changes_no_job_hash_or_params(tmp_path, assets):
    """A point evaluated by a grid sweep and by a budget search is the same run (resume shares it)."""
    from sweep.config.resolve import resolve_job
    from sweep.memo import ProcessMemo

    memo = ProcessMemo()
    point = ("model=yolov5n", "data=coco-val128", "data.limit=8", "sparsity=0.3")
    grid = resolve_job(make_cfg(tmp_path, *point), memo)
    searched = resolve_job(make_cfg(tmp_path, *point, "budget.keep=0.5", "budget.tol=0.05", "budget.metric=mAP50"),
                           memo)
    assert searched.config_hash == grid.config_hash and searched.params == grid.params
    assert not any(k.startswith("budget") for k in grid.params)


# -- the real CLI ------------------------------------------------------------------------------------------------
TINY = ("model=yolov5n", "data=coco-val128", "data.limit=8", "eval.imgsz=320")


def test_sparsity_on_the_command_line_is_refused_before_any_run(tmp_path):
    out = tmp_path / "outputs"
    p = run_cli(out, "-m", "hydra/sweeper=budget", "model=yolov5n", "sparsity=0.3,0.5", sweep_dir=tmp_path / "s")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: sparsity=0.3,0.5 is given, but the budget sweeper searches the sparsity")
    assert runs(out) == [] and not (out / "mlflow.db").exists() and not (tmp_path / "s").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arg,needle", [("budget.keep=1.5", "error: budget.keep=1.5 is invalid"),
                                        ("budget.metric=AP", "error: budget.metric='AP' is unknown"),
                                        ("budget.tol=0.99", "error: budget.tol=0.99 is invalid")])
def test_bad_budget_values_exit_2_before_any_run(tmp_path, arg, needle):
    out = tmp_path / "outputs"
    p = run_cli(out, "-m", "hydra/sweeper=budget", "model=yolov5n", arg, sweep_dir=tmp_path / "s")
    assert p.returncode == 2 and p.stderr.startswith(needle) and "Traceback" not in p.stderr
    assert runs(out) == []


def _kids(out):
    return [r for r in runs(out) if r.data.tags.get("sweep.role") == "job"]


def test_budget_search_end_to_end_answers_logs_and_resumes(tmp_path, assets):
    out = tmp_path / "outputs"
    args = ("-m", "hydra/sweeper=budget", *TINY, "budget.keep=0.5", "budget.tol=0.25", "budget.hi=0.5")
    p = run_cli(out, *args, sweep_dir=tmp_path / "s1")
    assert p.returncode == 0, p.stderr[-3000:]
    # round 1: the dense reference and the midpoint 0.5 (fails); round 2: 0.25 (passes)
    assert "3 done, 0 skipped, 0 failed" in p.stdout
    assert sorted(d.name for d in (tmp_path / "s1").iterdir() if d.is_dir()) == ["0", "1", "2"]
    kids = _kids(out)
    [parent] = [r for r in runs(out) if r.data.tags.get("sweep.role") == "parent"]
    assert sorted(r.info.run_name for r in kids) == [
        "yolov5n-l1_unstructured-s0.00", "yolov5n-l1_unstructured-s0.25", "yolov5n-l1_unstructured-s0.50"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id and r.info.status == "FINISHED" for r in kids)
    m = {r.data.params["sparsity"]: r.data.metrics["mAP50-95"] for r in kids}
    assert m["0.25"] >= 0.5 * m["0.0"] > m["0.5"]
    # the answer: table, budget.json/csv in the sweep dir and on the parent run, metrics/tags per combination
    row = next(line for line in p.stdout.splitlines() if line.startswith("yolov5n    l1_unstructured"))
    assert row.split()[3:5] == ["0.25", f"{m['0.25']:.4f}"] and "[0.25, 0.5)" in row
    answer = json.loads((tmp_path / "s1" / "budget.json").read_text())
    [combo] = answer["combinations"]
    assert (combo["max_sparsity"], combo["bracket_hi"], combo["points"], combo["status"]) == (0.25, 0.5, 3, "found")
    assert math.isclose(combo["retention"], m["0.25"] / m["0.0"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store_uri(out))
    assert {"budget.json", "budget.csv"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    parent = client.get_run(parent.info.run_id)
    assert parent.data.metrics["budget.max_sparsity/yolov5n-l1_unstructured"] == 0.25
    assert parent.data.tags["budget.bracket/yolov5n-l1_unstructured"] == "[0.25, 0.5)"
    assert parent.data.tags["budget.keep"] == "0.5"
    # the report at the end includes the search's jobs
    assert (out / "reports" / "s1" / "results.csv").read_text().count("yolov5n-l1_unstructured-s0.") == 3

    # the same search again: every point resumed, the same answer, no new run
    p2 = run_cli(out, *args, "report=false", sweep_dir=tmp_path / "s2")
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "0 done, 3 skipped, 0 failed" in p2.stdout
    [again] = json.loads((tmp_path / "s2" / "budget.json").read_text())["combinations"]
    assert {k: v for k, v in again.items() if k != "overrides"} == {k: v for k, v in combo.items() if k != "overrides"}
    assert len(_kids(out)) == 3


@pytest.mark.slow
def test_parallel_launcher_k_section_launches_one_round_at_a_time(tmp_path, assets):
    """With the joblib launcher and 2 workers, each round evaluates 2 points per bracket (3-section)."""
    out = tmp_path / "outputs"
    p = run_cli(out, "-m", "hydra/sweeper=budget", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", *TINY,
                "data.limit=4", "budget.keep=0.5", "budget.tol=0.1", "budget.hi=0.5", "report=false",
                sweep_dir=tmp_path / "s")
    assert p.returncode == 0, p.stderr[-3000:]
    answer = json.loads((tmp_path / "s" / "budget.json").read_text())
    assert answer["budget"]["points"] == 2
    [combo] = answer["combinations"]
    assert combo["status"] == "found" and math.isclose(combo["bracket_hi"] - combo["max_sparsity"], 0.1)
    jobs = sorted(int(d.name) for d in (tmp_path / "s").iterdir() if d.is_dir())
    assert jobs == list(range(len(jobs))) and len(jobs) == combo["points"]


@pytest.mark.parametrize("budget", [True, False])
def test_a_glob_over_a_config_group_is_expanded_by_the_preflight(tmp_path, assets, budget):
    """Regression: the pre-flight parsed overrides without Hydra's config loader, so ``model=glob(...)`` (which
    Hydra's sweepers expand over the config group) crashed it with 'ConfigLoader is not set'."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from sweep.config.schema import register_configs
    from sweep.track.callbacks import check_sweep, sweep_overrides

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[*(["hydra/sweeper=budget"] if budget else []), f"paths.outputs={tmp_path}",
                                           "model=yolov5n", "data=coco-val128"], return_hydra_config=True)
        with open_dict(cfg):  # the command line of `python -m sweep -m ...` (compose refuses sweep syntax)
            cfg.hydra.overrides.task = ["model=glob(yolov5n)", "data=coco-val128",
                                        *([] if budget else ["sparsity=0,0.3"])]
        assert check_sweep(cfg) == {}
        if not budget:
            assert sweep_overrides(cfg) == [["model=yolov5n", "data=coco-val128", "sparsity=0"],
                                            ["model=yolov5n", "data=coco-val128", "sparsity=0.3"]]
