"""Smoke test of the variational part of benchmarks/hypergrad_accuracy.py (--quick)."""

import json

from test_benchmarks_smoke import load


def test_variational_part_quick(tmp_path):
    payload = load("hypergrad_accuracy").main(["--quick", "--parts", "variational", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "hypergrad_accuracy.json").read_text())
    assert set(saved) >= {"config", "variational"} and not saved["priors"]
    assert (tmp_path / "hypergrad_accuracy.png").read_bytes().startswith(b"\x89PNG")
    part = payload["variational"]
    for ref in part["reference"]:
        assert ref["grad_norm"] < 1e-10 and ref["min_hessian_eigenvalue"] > 0, ref
    by_k = part["median_by_steps"]
    assert set(by_k) == {1, 10, 50}
    for name in ("implicit CG5", "implicit CG10", "implicit CG20", "explicit"):
        assert by_k[50][name] < by_k[1][name], name
    assert by_k[50]["implicit CG20"] < by_k[50]["explicit"]
