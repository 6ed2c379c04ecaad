import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    return importlib.import_module(f"benchmarks.{name}")


def test_hypergrad_accuracy_quick(tmp_path):
    payload = load("hypergrad_accuracy").main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "hypergrad_accuracy.json").exists()
    png = tmp_path / "hypergrad_accuracy.png"
    assert png.read_bytes().startswith(b"\x89PNG")
    png.unlink()  # --plot-only redraws it from the JSON alone
    assert load("hypergrad_accuracy").main(["--plot-only", str(tmp_path / "hypergrad_accuracy.json")])["priors"]
    assert png.read_bytes().startswith(b"\x89PNG")
    for name in ("isotropic", "diagonal"):
        by_cg = payload["priors"][name]["median_by_cg_iters"]
        assert by_cg[1] > by_cg[5] > by_cg[20] and by_cg[20] < 1e-8
        by_k = payload["priors"][name]["median_by_steps"]
        assert by_k[50]["explicit"] < by_k[1]["explicit"]


def test_overhead_quick(tmp_path):
    result = load("overhead").main(["--quick", "--meta-batch", "4", "--chunk-size", "2", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "overhead.json").read_text())
    assert saved["overhead_ratio"] == result["overhead_ratio"] > 0
    assert set(saved["ms"]) >= {"inner_gradients", "cg_hvps", "outer_gradient", "meta_step"}
    assert 0 < saved["operators_per_meta_iteration"]["compute"] < saved["operators_per_meta_iteration"]["total"]
    (entry,) = saved["summary"]
    assert entry["threshold"] == 1.5 and entry["met"] is None  # a GPU target, not judged on the CPU


def test_scaling_quick(tmp_path):
    load("scaling").main(["--quick", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "scaling.json").read_text())
    assert (tmp_path / "scaling.png").stat().st_size > 0
    rows = payload["results"]
    assert {(r["workload"], r["estimator"], r["mode"]) for r in rows} == {
        (w, e, m) for w in ("sine", "conv4") for e in ("explicit", "implicit") for m in ("vmap", "loop")}
    for r in rows:
        assert r["status"] == "ok" and r["ms"] > 0 and r["tasks_per_s"] > 0
        assert (r["gb_per_task"] is None) == (r["mode"] == "loop" or r["peak_bytes"] is None)
    assert payload["vmap_fallbacks"] == []  # every operation batched under vmap
    assert payload["loop_over_vmap_time_ratio"]
    targets = {e["target"]: e for e in payload["summary"]}
    assert {"conv4_tasks_per_s[vmap]", "conv4_gb_per_task[vmap]", "sine_ms[vmap]",
            "implicit_memory_k100_over_k1[vmap]", "cpu_vmap_speedup_sine"} <= set(targets)
    assert all(e["met"] is None for e in targets.values())  # the quick grid has none of the target settings


def test_anchors_quick(tmp_path):
    anchors = load("anchors")
    assert anchors.try_import("no_such_library_xyz")[0] is None  # a missing library is skipped, not an error
    for workload in ("sine", "conv4"):
        out = tmp_path / workload
        payload = anchors.main(["--quick", "--workload", workload, "--out", str(out)])
        saved = json.loads((out / "anchors.json").read_text())
        names = {r["implementation"] for r in saved["results"]}
        assert {"ibaml implicit vmap", "ibaml implicit loop", "ibaml explicit vmap", "ibaml explicit loop"} <= names
        assert saved["workload"]["check_damping"] == 0.0          # the check is of the timed configuration
        for library, anchor, check in (("torchopt", "torchopt implicit loop", "torchopt vs ibaml implicit, K=2"),
                                       ("higher", "higher explicit loop", "higher vs ibaml explicit, K=2")):
            if payload["libraries"][library]["available"]:
                assert anchor in names
                agreement = saved["gradient_agreement"][check]
                # on sine the inner Hessian is positive definite and the two solves agree; on the
                # quick Conv4 it may not be, and the check says whether ibaml's CG ran to the end
                if workload == "sine" or agreement.get("all_cg_iterations_ran", True):
                    assert agreement["relative_error"] < 1e-4, (workload, check)
            else:
                assert anchor not in names and payload["libraries"][library]["reason"]


def test_precision_quick(tmp_path):
    load("precision").main(["--quick", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "precision.json").read_text())
    by = {(r["workload"], r["precision"]): r for r in payload["results"]}
    for workload in ("sine", "conv4"):
        assert by[(workload, "float64")]["relative_error"] < 1e-4  # float32 itself is accurate
        for precision in ("autocast bfloat16", "autocast float16"):   # both run on the CPU, batch norm included
            assert "error" not in by[(workload, precision)], by[(workload, precision)].get("error")
            assert by[(workload, precision)]["relative_error"] > 0
    assert by[("sine", "autocast bfloat16")]["relative_error"] < 1e-2  # measured: about 3e-3 on the CPU
    assert len(payload["summary"]) == 4 and all(e["threshold"] == 1e-2 for e in payload["summary"])


def test_cg_curvature_test_is_not_autocast(tmp_path):
    # Under vmap, torch.dot becomes a batched matrix product that autocast runs in float16;
    # the rounded p·Ap then stopped CG early in some tasks of this batch.
    import torch

    harness, precision = load("_harness"), load("precision")
    device = torch.device("cpu")
    learner = harness.build_learner("sine", "implicit", 10, 5, device, torch.float32)
    task = harness.prepare(learner, harness.make_batch("sine", 25, torch.float32, device))
    reference, _ = precision.meta_gradient(learner, task)
    grads, iterations = precision.meta_gradient(learner, task, torch.float16)
    assert (iterations == 5).all()
    assert precision.relative(grads, reference) < 1e-2


def test_cpu_tensor_peak_counts_live_tensors():
    """The tensor-level CPU peak is the most bytes alive at once: two megabyte buffers one after
    the other (the first freed) peak at one, two held together at two, nothing allocated at zero."""
    import torch

    peak = load("_harness").cpu_tensor_peak
    n = 2 ** 18   # float32: 1 MiB

    def one_after_the_other():
        for _ in range(2):
            torch.ones(n).sum()

    def together():
        a, b = torch.ones(n), torch.ones(n)
        return (a + b).sum()

    mib = 2 ** 20
    assert mib <= peak(one_after_the_other) < 1.01 * mib
    assert 3 * mib <= peak(together) < 3.01 * mib     # a, b and a + b
    assert peak(lambda: None) == 0


def test_image_table_reads_runs(tmp_path, capsys):
    def run(name, method, accuracy, **config):
        folder = tmp_path / name
        folder.mkdir()
        metrics = {k: {"mean": v, "ci95": 0.01} for k, v in
                   dict(accuracy=accuracy, nll=1.0, ece=0.2, brier=0.5).items()}
        metrics.update(ms_per_meta_iter=1500.0, config=dict(dict(method=method, shots=1, meta_lr=1e-3), **config))
        (folder / "metrics.json").write_text(json.dumps(metrics))
        return str(folder)

    paths = [run("a", "ibaml", 0.682, init_scale=0.01, kl_weight=0.001), run("b", "maml", 0.631, meta_lr=3e-3)]
    rows = load("image_table").main(paths + ["--out", str(tmp_path / "table.json")])
    table = capsys.readouterr().out
    assert "| a | ibaml | 1 | init_scale=0.01, kl_weight=0.001 | 0.682 ± 0.010 |" in table
    assert "| b | maml | 1 | meta_lr=0.003 | 0.631 ± 0.010 |" in table and "1.50 |" in table
    assert json.loads((tmp_path / "table.json").read_text()) == rows


def test_posterior_response_reads_a_run(tmp_path):
    spec = importlib.util.spec_from_file_location("sine_regression", ROOT / "examples" / "sine_regression.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--method", "ibaml", "--meta-iters", "2", "--meta-batch", "2", "--eval-tasks", "4",
                  "--checkpoint-every", "2", "--no-progress", "--out", str(tmp_path / "run")])
    result = load("posterior_response").main([str(tmp_path / "run"), "--tasks", "12", "--noise-fit-tasks", "20",
                                              "--refit-per-shots", "--out", str(tmp_path / "response.json")])["ibaml"]
    refit = result["refit_per_shots"]
    assert list(refit) == [1, 3, 10, 30] and all(0 <= r["coverage_90"] <= 1 for r in refit.values())
    assert all(r["noise_prior_fit"]["tails"][1]["family"] == "lognormal_scale" for r in refit.values())
    assert set(result["shots"]) == {1, 3, 10, 30} and result["epistemic_30_over_1"] > 0
    bins = result["by_amplitude"]
    assert list(bins) == ["0.1-1.0", "1.0-2.5", "2.5-5.0"] and sum(b["tasks"] for b in bins.values()) == 12
    for row in bins.values():
        assert row["tasks"] == 0 or (0 <= row["coverage_90"] <= 1 and row["mean_std"] > 0)
    tails = load("noise_tails").main([str(tmp_path / "run"), "--fit-tasks", "30", "--eval-tasks", "20",
                                      "--out", str(tmp_path / "tails.json")])
    (row,) = tails.values()
    assert json.loads((tmp_path / "tails.json").read_text()).keys() == tails.keys()
    assert 1.05 <= row["student_t"]["df"] <= 1000
    # the Student-t family holds the Gaussian (ν → ∞): its in-sample NLL is no worse
    assert row["student_t"]["fit_tasks"]["nll"] <= row["gaussian"]["fit_tasks"]["nll"] + 1e-3
    # so does the log-normal scale mixture (τ → 0), whose coverage levels are fractions
    assert row["lognormal_scale"]["fit_tasks"]["nll"] <= row["gaussian"]["fit_tasks"]["nll"] + 1e-3
    assert all(0 <= row["lognormal_scale"]["eval_tasks"][k] <= 1 for k in ("coverage_50", "coverage_90", "coverage_95"))
    assert row["standardised_errors_gaussian_fit"]["kurtosis_pooled"] > 0


def test_logit_scale_sweep_rescores_a_run(tmp_path):
    """A tiny image run re-scored at fixed scales: the learned scale's row equals the run's own
    report (the same tasks and draws), and the scale leaves a point estimate's accuracy alone."""
    spec = importlib.util.spec_from_file_location("miniimagenet", ROOT / "examples" / "miniimagenet.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    run = tmp_path / "run"
    result = example.main(["--fixture", "--format", "pickle", "--method", "imaml", "--ways", "3", "--shots", "1",
                           "--query", "2", "--channels", "8", "--image-size", "16", "--inner-steps", "2",
                           "--cg-steps", "2", "--meta-batch", "2", "--meta-iters", "2", "--val-every", "0",
                           "--val-tasks", "4", "--eval-tasks", "6", "--eval-chunk", "4", "--no-progress",
                           "--out", str(run)])
    payload = load("logit_scale_sweep").main([str(run), "--scales", "0.5,2", "--out", str(tmp_path / "sweep.json")])
    res = payload["run"]
    assert json.loads((tmp_path / "sweep.json").read_text()) == payload
    rows = res["scales"]
    assert len(rows) == 3 and res["method"] == "imaml"
    own = rows[f"{res['learned_scale']:.4g}"]
    for key in ("accuracy", "ece", "ece_pooled", "nll"):
        assert abs(own[key] - result[key]["mean"]) < 1e-9, key
    assert len({round(r["accuracy"], 12) for r in rows.values()}) == 1
    assert rows["0.5"]["confidence"] < rows["2"]["confidence"]


def test_memory_profile_quick(tmp_path):
    payload = load("memory_profile").main(["--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "memory_profile.json").read_text())
    assert set(saved["phases_bytes"]) == {"inner solve", "query pass", "implicit solve", "task gradient"}
    assert saved["task"] == {"ways": 5, "shots": 1, "query_images": 75, "support_images": 5}
    sweep = payload["query_pass_bytes_by_query_images"]
    if sweep[75] is not None:   # the query pass grows with the query images it holds
        assert sweep[75] > sweep[15]


def test_sine_curve_quick(tmp_path):
    payload = load("sine_curve").main(["--method", "imaml", "--meta-iters", "4", "--every", "2", "--val-tasks", "20",
                                       "--cosine", "--out", str(tmp_path / "curve.json")])
    assert json.loads((tmp_path / "curve.json").read_text()) == payload
    assert [e["step"] for e in payload["history"]] == [2, 4]
    assert sum(b["tasks"] for b in payload["mse_by_amplitude"].values()) == 20
    mses = [t["mse"] for t in payload["worst_tasks"]]
    assert mses == sorted(mses, reverse=True) and len(mses) == 10


def test_method_cost_quick(tmp_path):
    payload = load("method_cost").main(["--quick", "--methods", "imaml,ibaml", "--steps", "preset,2",
                                        "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "method_cost.json").read_text())
    assert [(r["method"], r["inner_steps"]) for r in saved["rows"]] == [("imaml", 2), ("ibaml", 10), ("imaml", 2),
                                                                         ("ibaml", 2)]
    assert all(r["ms"] > 0 for r in payload["rows"]) and saved["summary"][0]["measured"] == payload["rows"][3]["ratio_to_imaml"]


def test_variational_study_image_rows_run_the_example(tmp_path):
    study = load("variational_study")
    runs = study.main(["--problem", "image", "--rows", "imaml λ=30, τ fixed", "--iters", "1", "--eval-tasks", "2",
                       "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "image_study.json").read_text())
    assert list(saved["rows"]) == ["imaml λ=30, τ fixed, seed 0"] == list(runs)
    config = saved["rows"]["imaml λ=30, τ fixed, seed 0"]["config"]
    assert config["precision"] == 30.0 and config["logit_scale"] == "fixed" and config["fixture_kind"] == "strokes"
    assert (tmp_path / "image_study.png").exists()


def test_cg_accuracy_quick(tmp_path):
    payload = load("cg_accuracy").main(["--quick", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "cg_accuracy.json").read_text()) == payload
    assert (tmp_path / "cg_accuracy.png").read_bytes().startswith(b"\x89PNG")
    assert [r["preset"] for r in payload["results"]] == ["sine/imaml", "sine/ibaml", "image/imaml-1shot"]
    for result in payload["results"]:
        assert result["default_cg_iters"] == 20 and [p["step"] for p in result["points"]] == [0, 1]
        for point in result["points"]:   # more iterations, closer to the dense solve
            assert point["cg"]["20"]["max_task_rel_error"] < min(1e-8, point["cg"]["5"]["max_task_rel_error"])
            assert point["cg"]["20"]["mean_rel_error"] <= point["cg"]["20"]["max_task_rel_error"] * (1 + 1e-9)
    assert all(entry["holds"] for entry in payload["summary"])


def test_sine_error_map_reads_a_run(tmp_path):
    """The error map of a run: its bins partition the queries and the summed error, the MSE is the
    mean over all queries, and the features' non-affine share lies in [0, 1] per bin."""
    spec = importlib.util.spec_from_file_location("sine_regression", ROOT / "examples" / "sine_regression.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--method", "imaml", "--meta-iters", "2", "--meta-batch", "2", "--eval-tasks", "4",
                  "--no-progress", "--out", str(tmp_path / "run")])
    payload = load("sine_error_map").main([str(tmp_path / "run" / "imaml"), "--tasks", "30",
                                          "--out", str(tmp_path / "map.json")])
    assert json.loads((tmp_path / "map.json").read_text()) == payload
    assert (tmp_path / "map.png").read_bytes().startswith(b"\x89PNG")
    (run,) = payload["runs"]
    assert run["stream_seed"] == 40_000 and run["tasks"] == 30
    for bins in (run["by_x"], run["by_distance"]):
        assert sum(b["queries"] for b in bins.values()) == 300
        assert abs(sum(b["share"] for b in bins.values()) - 1) < 1e-5
        mean = sum(b["mse"] * b["queries"] for b in bins.values() if b["queries"]) / 300
        assert abs(mean - run["mse"]) < 1e-5 * max(1.0, run["mse"])
    inside, outside = run["inside_support_span"], run["outside_support_span"]
    assert inside["queries"] + outside["queries"] == 300 and 0 < outside["queries"] < 300
    assert all(0 <= v <= 1 for v in run["features_non_affine_share"].values())
