"""benchmarks/full_network_inner.py on a tiny MAML run (2 meta-iterations on the stroke benchmark):
the traces, the Hessian-free solver's monotone descent, and the descent ratio, which is 1 for
small steps on the smooth network and is what the table reports."""

import argparse
import json

import pytest
import torch

from benchmarks import _protocol as P
from benchmarks import full_network_inner as N
from benchmarks import image_protocol


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fn_inner")
    data = image_protocol.data_options(argparse.Namespace(ways=5, meta_iters=2, val_tasks=4, data_seed=0), 1)
    options = ["--method", "maml", "--inner-steps", 2, "--eval-tasks", 3, "--seed", 0, *data, "--channels", 4]
    P.run_example("miniimagenet.py", tmp / "protocol", options, keep=tmp / "runs" / "seed0" / "maml")
    return tmp


def test_solvers_are_traced_and_the_smooth_network_descends_as_its_gradient_says(run_root, tmp_path):
    torch.set_num_threads(1)
    payload = N.main(["--runs", str(run_root / "runs"), "--tasks", "2", "--sgd-steps", "6", "--hf-steps", "3",
                      "--hf-cg", "4", "--lr", "0.001", "--ratio-steps", "1e-6,1e-2", "--out", str(tmp_path)])
    assert [r["network"] for r in payload["runs"]] == ["relu-max", "silu-avg", "silu-softmax"]
    for run in payload["runs"]:
        assert run["loaded"]["kept"] == ["model.prior.precision"]
        for task in run["tasks"]:
            sgd, hf = task["sgd"], task["hf"]
            assert len(sgd["values"]) == len(sgd["grad_norms"]) == 7 and len(hf["values"]) == 4
            assert all(b <= a + 1e-9 for a, b in zip(hf["values"], hf["values"][1:]))   # the line search
            assert hf["final_damping"] > 0 and sgd["final_damping"] is None
            assert sgd["values"][1] < sgd["values"][0]                                  # a small first step descends
    for smooth in payload["runs"][1:]:
        for task in smooth["tasks"]:
            assert task["sgd"]["descent_ratio"]["1e-06"] == pytest.approx(1.0, abs=1e-3)
    saved = json.loads((tmp_path / "inner.json").read_text())
    assert saved["settings"]["sgd_steps"] == 6 and (tmp_path / "inner.png").is_file()
    assert "| maml | 0 | silu-avg |" in N.markdown(payload["runs"], payload["settings"])


def test_unknown_networks_are_refused(run_root):
    with pytest.raises(SystemExit):
        N.main(["--runs", str(run_root / "runs"), "--networks", "tanh-max"])
