"""benchmarks/image_shift.py on two tiny runs of the image protocol (iMAML and iBaML, 2
meta-iterations on the stroke benchmark, run as ``benchmarks.image_protocol final`` runs them):
the temperature refit equals the run's own, every condition is reported raw and
temperature-scaled with finite numbers, and non-finite tasks are counted, not dropped."""

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from benchmarks import _protocol as P
from benchmarks import image_protocol, image_shift
from ibaml.data import EpisodeSampler, ImageClassDataset

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("imaml", "ibaml")


@pytest.fixture(scope="module")
def shift(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image_shift")
    runs = tmp / "runs" / "5shot"
    data = image_protocol.data_options(argparse.Namespace(ways=5, meta_iters=2, val_tasks=4, data_seed=0), 5)
    for method in METHODS:   # the protocol's final runs, kept as --keep-runs keeps them
        options = ["--method", method, "--eval-tasks", 3, "--seed", 0, *data, "--channels", 8]
        P.run_example("miniimagenet.py", tmp / "protocol" / method, options, keep=runs / "seed0" / method)
    (runs / "seed1" / "imaml").mkdir(parents=True)     # a run still going: no metrics.json
    shutil.copy(runs / "seed0" / "imaml" / "last.pt", runs / "seed1" / "imaml" / "last.pt")
    torch.set_num_threads(1)
    payload = image_shift.main(["--runs", str(tmp / "runs"), "--out", str(tmp / "out"), "--tasks", "3", "--chunk", "2",
                                "--shots", "1,5", "--shifted-shots", "1", "--shifted-classes", "5"])
    return tmp, runs, payload


def _numbers(value):
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def test_reports_every_condition_raw_and_temperature_scaled(shift):
    tmp, runs, payload = shift
    saved = json.loads((tmp / "out" / "shift.json").read_text())
    assert set(saved) >= {"protocol", "split", "streams", "training_data", "shifted_pool", "settings", "runs",
                          "incomplete_runs", "torch", "models"}
    assert saved["torch"] == torch.__version__
    assert saved["shifted_pool"]["knobs"]["seed"] == 1 and saved["shifted_pool"]["knobs"]["strokes"] == [5, 8]
    assert saved["shifted_pool"]["knobs"]["thickness"] == [1.0, 2.5]
    assert list(saved["models"]) == list(METHODS)
    for method, entry in saved["models"].items():
        assert entry["seeds"] == [0] and entry["nonfinite"] == []
        conditions = entry["per_seed"]["0"]["conditions"]
        assert {pool: list(c) for pool, c in conditions.items()} == {"test": ["1", "5"], "shifted": ["1"]}
        streams = [c["stream_seed"] for cells in conditions.values() for c in cells.values()]
        assert len(set(streams)) == len(streams) and not set(streams) & {0, 10_000, 20_000, 30_000}
        for pool, cells in conditions.items():
            for label, c in cells.items():
                assert (c["tasks"], c["nonfinite_tasks"], c["errors"], c["shots"]) == (3, 0, [], int(label))
                assert c["classes"] == image_shift.POOLS[pool]
                for kind in image_shift.KINDS:
                    assert set(c[kind]) == set(image_shift.METRICS)
                    values = _numbers(c[kind])
                    assert values and all(math.isfinite(v) for v in values), (method, pool, label, kind)
                    assert 0 <= c[kind]["accuracy"]["mean"] <= 1 and 0 <= c[kind]["ece_pooled"]["mean"] <= 1
                    assert sum(c["bins"][kind]["count"]) == 3 * 5 * 15
        summary = entry["summary"]["shifted"]["1"]["calibrated"]["ece_pooled"]
        assert summary == {"mean": conditions["shifted"]["1"]["calibrated"]["ece_pooled"]["mean"], "std": 0.0}
    imaml = saved["models"]["imaml"]["per_seed"]["0"]["conditions"]["test"]["1"]
    assert imaml["raw"]["accuracy"] == imaml["calibrated"]["accuracy"]   # one draw: the scale moves no argmax
    for name in ("ece_vs_shots.png", "reliability_test_1shot.png", "reliability_shifted_1shot.png"):
        assert (tmp / "out" / name).read_bytes().startswith(b"\x89PNG")
    table = (tmp / "out" / "table.md").read_text()
    assert "| ibaml | T-scaled |" in table and "| shifted 1 shot |" in table
    assert image_shift.render(saved, tmp / "out") == table                # the table is its JSON


def test_temperature_refit_equals_the_runs(shift):
    """The scale is fitted to the example's own validation tasks (validation classes, 5 shots,
    stream 10000 + S, the run's task count and chunk) and equals the one in its metrics.json."""
    tmp, runs, payload = shift
    for method, entry in payload["models"].items():
        run = json.loads((runs / "seed0" / method / "metrics.json").read_text())
        r = entry["per_seed"]["0"]
        assert r["validation"] == {"classes": "validation classes of the run's dataset", "stream_seed": 10_000,
                                   "tasks": 4, "shots": 5, "chunk": 25, "nonfinite_tasks": 0, "errors": []}
        assert r["logit_scale"]["fitted"] == pytest.approx(run["calibrated"]["logit_scale"], rel=1e-4)
        assert r["logit_scale"]["learned"] == pytest.approx(run["logit_scale"], rel=1e-5)
        assert r["rebuilt_as_run"] and entry["rebuilt_as_run"]
    # the unfinished run (a checkpoint without metrics.json) is listed, not evaluated
    assert payload["incomplete_runs"] == [str(runs / "seed1" / "imaml" / "last.pt")]


def test_update_measures_some_methods_again_and_keeps_the_others(shift, tmp_path):
    """``--update --methods ibaml`` measures iBaML's runs again and keeps iMAML's models from the
    existing shift.json; an existing file of other conditions is refused."""
    tmp, runs, payload = shift
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(tmp / "out" / "shift.json", out / "shift.json")
    common = ["--runs", str(tmp / "runs"), "--out", str(out), "--chunk", "2", "--shots", "1,5", "--shifted-shots", "1",
              "--shifted-classes", "5", "--methods", "ibaml", "--update"]
    updated = image_shift.main([*common, "--tasks", "3"])
    assert list(updated["models"]) == list(METHODS)
    assert updated["updated"] == {"measured_again": ["ibaml"], "kept": ["imaml"]}
    saved = json.loads((out / "shift.json").read_text())
    before = json.loads((tmp / "out" / "shift.json").read_text())
    assert saved["models"]["imaml"]["per_seed"] == before["models"]["imaml"]["per_seed"]
    again, first = (d["models"]["ibaml"]["per_seed"]["0"]["conditions"] for d in (saved, before))
    assert again == first                                                 # the same tasks, measured again
    with pytest.raises(SystemExit, match="--update: the existing shift.json has tasks 3, this run 2"):
        image_shift.main([*common, "--tasks", "2"])


class _Flaky:
    """A learner whose second chunk raises and whose third gives a NaN output."""

    def __init__(self):
        self.generator, self.calls = torch.Generator(), 0

    def task_outputs(self, sample, n, chunk):
        batch, self.calls = sample(n), self.calls + 1
        if self.calls == 2:
            raise RuntimeError("linalg.cholesky: not positive-definite\nmore detail")
        out = torch.zeros(n, 1, batch.query_y.shape[1], 3, dtype=torch.float64)
        out[..., 0] = 1.0
        if self.calls == 3:
            out[0, 0, 0, 1] = math.nan
        return out, batch.query_y


def test_nonfinite_tasks_are_counted_not_dropped():
    images = torch.randint(0, 256, (24, 3, 8, 8), dtype=torch.uint8)
    sampler = EpisodeSampler(ImageClassDataset(images, torch.arange(24) % 4, list("abcd")), 3, 1, 2, seed=0)
    out, labels, errors = image_shift.task_outputs(_Flaky(), sampler, 5, 2, seed=7)
    assert out.shape == (5, 1, 6, 3) and labels.shape == (5, 6)
    assert errors == ["tasks 2-3: linalg.cholesky: not positive-definite"]
    entry = image_shift.condition_metrics(out, labels, {"raw": 1.0, "calibrated": 2.0})
    assert (entry["tasks"], entry["nonfinite_tasks"]) == (5, 3)
    assert entry["raw"]["accuracy"]["mean"] == pytest.approx(1 / 3)      # label 0 of 3, over the 2 finite tasks
    per_seed = {"0": {"validation": {"shots": 5, "nonfinite_tasks": 0, "tasks": 4},
                      "conditions": {"test": {"1": {**entry, "errors": errors}}}}}
    assert image_shift.nonfinite_list(per_seed) == [{"pool": "test", "shots": 1, "seed": 0, "nonfinite_tasks": 3,
                                                     "tasks": 5}]
    assert image_shift.summarize(per_seed)["test"]["1"]["nonfinite_tasks"] == {"0": 3}


def test_committed_table_and_page_are_the_json():
    """``docs/results/image_benchmark/shift/table.md`` and the image section of
    ``docs/results/shift.md`` (its pooled-ECE and accuracy tables and the sentences comparing
    iBaML with MAML and ANIL) are rendered from the committed ``shift.json``."""
    folder = ROOT / "docs/results/image_benchmark/shift"
    payload = json.loads((folder / "shift.json").read_text())
    models, settings = payload["models"], payload["settings"]
    assert (folder / "table.md").read_text() == image_shift.markdown(models, settings)
    assert all(entry["rebuilt_as_run"] for entry in models.values())
    page = (ROOT / "docs/results/shift.md").read_text().splitlines()
    rendered = (image_shift.metric_table(models, settings, "ece_pooled")
                + image_shift.metric_table(models, settings, "accuracy", ("raw",))
                + image_shift.findings(models, settings))
    missing = [line for line in rendered if line not in page]
    assert not missing, "shift.md lines that differ from the committed JSON:\n" + "\n".join(missing)


def test_support_scaled_step_gives_a_gradient_method_its_training_support_size(shift, monkeypatch):
    """``--support-scaled-step``: a gradient method (MAML, ANIL, ABML) rebuilt with
    ``inner_support_size = ways · shots`` of its meta-training; an implicit method as it was."""
    tmp, runs, _ = shift
    run = next(r for r in image_shift.find_runs(tmp / "runs")[0] if r["method"] == "imaml")
    assert image_shift.rebuild(run, torch.device("cpu"), support_scaled=True)[0].inner_loop.support_size is None
    real = image_shift.load_checkpoint

    def as_anil(path, **kw):   # the same checkpoint read as an ANIL run's configuration
        state = real(path, **kw)
        return {**state, "config": {**state["config"], "method": "anil"}}

    seen = []
    monkeypatch.setattr(image_shift, "load_checkpoint", as_anil)
    monkeypatch.setattr(image_shift, "image_learner_from_config",
                        lambda config, shape, device: seen.append(config) or argparse.Namespace(
                            load_training_state=lambda state: None))
    image_shift.rebuild(run, torch.device("cpu"), support_scaled=True)
    image_shift.rebuild(run, torch.device("cpu"))
    assert seen[0]["inner_support_size"] == 25 and seen[1].get("inner_support_size") is None


def test_support_size_findings_name_the_sizes_that_changed():
    """Two adaptations of the same models: sizes whose raw metrics are equal at every seed are
    named as the same, the others with both values."""
    def payload(acc10):
        cell = lambda acc: {"raw": {"accuracy": {"mean": acc}, "nll": {"mean": 1.0}, "ece_pooled": {"mean": 0.1}}}
        summary = {"test": {"5": {"raw": {m: {"mean": v} for m, v in (("accuracy", 0.9), ("nll", 0.3), ("ece_pooled", 0.01))}},
                            "10": {"raw": {m: {"mean": v} for m, v in (("accuracy", acc10), ("nll", 0.4), ("ece_pooled", 0.02))}}}}
        per_seed = {"0": {"conditions": {"test": {"5": cell(0.9), "10": cell(acc10)}}}}
        return {"anil": {"summary": summary, "per_seed": per_seed}}
    text = image_shift.support_size_findings(payload(0.95), payload(0.81), "anil", "scaled", "as trained")
    assert text == ("- anil: the same at 5 shots (every seed); at 10 shots accuracy 0.950 scaled against 0.810 as "
                    "trained, NLL 0.400 against 0.400, pooled ECE 0.020 against 0.020.")
    assert image_shift.support_size_findings(payload(0.9), {}, "anil", "a", "b") == ""
