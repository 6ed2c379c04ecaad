"""Smoke test of ``python -m benchmarks.claims``: a --quick run writes the four JSON files and figures."""

import json

from benchmarks import claims


def test_quick_run_writes_results(tmp_path):
    claims.main(["--quick", "--out", str(tmp_path)])
    for name in ("memory", "accuracy", "horizon", "recipes"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    memory = json.loads((tmp_path / "memory.json").read_text())
    accuracy = json.loads((tmp_path / "accuracy.json").read_text())
    horizon = json.loads((tmp_path / "horizon.json").read_text())
    for payload, claim in ((memory, "memory"), (accuracy, "accuracy"), (horizon, "horizon")):
        assert payload["claim"] == claim
        assert payload["rows"] and isinstance(payload["table"], str) and payload["table"].startswith("|")

    assert "ru_maxrss" in memory["memory_measure"]
    Ks = memory["config"]["Ks"]
    for row in memory["rows"]:
        assert set(row) >= {"estimator", "method", "K", "peak_mb", "seconds"}
        assert row["seconds"] > 0
    for method in ("map", "variational"):
        peak = {r["estimator"]: r["peak_mb"] for r in memory["rows"] if r["method"] == method and r["K"] == max(Ks)}
        assert peak["explicit"] > peak["implicit"], (method, peak)

    names = {r["estimator"] for r in accuracy["rows"]}
    assert names == {"explicit", "implicit CG5", "implicit CG10", "implicit CG20", "lazy"}
    for row in accuracy["rows"]:
        assert 0 <= row["rel_error_median"] < float("inf")
    assert all(s["grad_norm"] < 1e-8 for s in accuracy["reference_stationarity"])

    runs = {(r["method"], r["K"]) for r in horizon["rows"]}
    assert runs == {("maml", 1), ("maml", 5), ("lazy", 5), ("imaml", 5), ("ibaml", 5)}
    for row in horizon["rows"]:
        for key in ("mse", "nll", "ms_per_meta_iter", "mse_before_meta_training"):
            assert row[key] == row[key] and row[key] < float("inf"), (row, key)
        assert row["peak_mb"] >= 0 and len(row["seeds"]) == 1

    merged = claims.main(["--merge", str(tmp_path), "--out", str(tmp_path / "merged")])["horizon"]
    assert merged["rows"] == horizon["rows"] and merged["config"] == horizon["config"]

    recipes = json.loads((tmp_path / "recipes.json").read_text())
    assert recipes["claim"] == "recipes" and recipes["table"].startswith("|")
    assert {(r["method"], r["K"]) for r in recipes["rows"]} == {(m, K) for m in ("maml", "imaml-hf") for K in (5, 20)}
    maml, hf = recipes["summary"]["maml"], recipes["summary"]["imaml-hf"]
    assert maml["estimator"] == "explicit" and "flat" not in maml
    assert hf["estimator"] == "implicit" and hf["flat"] == (hf["tensor_peak_ratio"] <= claims.FLAT_MEMORY_BOUND)
    # unrolling 20 steps holds more tensors than 5; the implicit recipe's tensors do not grow
    assert maml["tensor_peak_ratio"] > 2 and hf["tensor_peak_ratio"] == 1.0 and hf["flat"], (maml, hf)
    assert maml["peak_ratio"] == maml["peak_mb_at_K_max"] / maml["peak_mb_at_K_min"]
    assert maml["tensor_peak_ratio"] == maml["tensor_peak_mb_at_K_max"] / maml["tensor_peak_mb_at_K_min"]
