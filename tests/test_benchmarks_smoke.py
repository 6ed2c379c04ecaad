import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hypergrad_accuracy_quick(tmp_path):
    payload = load("hypergrad_accuracy").main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "hypergrad_accuracy.json").exists()
    for name in ("isotropic", "diagonal"):
        by_cg = payload["priors"][name]["median_by_cg_iters"]
        assert by_cg[1] > by_cg[5] > by_cg[20] and by_cg[20] < 1e-8
        by_k = payload["priors"][name]["median_by_steps"]
        assert by_k[50]["explicit"] < by_k[1]["explicit"]


def test_overhead_quick(tmp_path):
    result = load("overhead").main(["--quick", "--meta-batch", "4", "--out", str(tmp_path)])
    assert result["overhead_ratio"] > 0 and (tmp_path / "overhead.json").exists()
