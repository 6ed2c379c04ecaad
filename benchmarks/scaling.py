"""Time and peak memory per meta-iteration versus the number of inner steps K.

For each workload, meta-batch ``T``, estimator (explicit: unrolled backpropagation through
the ``K`` SGD steps, MAML; implicit: the inner loop without a graph, then CG on
Hessian-vector products, iMAML) and ``K ∈ {1, 5, 10, 20, 50, 100}``, one learner runs its
meta-iteration in each mode — ``vmap`` over the tasks, the same under ``torch.compile``
(``compile``, opt-in), or a Python ``loop`` over the tasks — and the modes are timed in
turn (see ``benchmarks/_harness.py`` for what a meta-iteration is and how time and memory
are measured). Workloads: the sine MLP 1-40-40-1 (meta-batches 4, 25, 32) and Conv4-64 on
5-way 1-shot episodes with 15 query images per class at 84×84 (meta-batches 4 and 32).

Reported per configuration: median ms per meta-iteration, tasks per second (``T`` / time),
peak memory (the median of ``--memory-repeats`` calls), the number of tasks the
meta-iteration holds in memory at once (``tasks_in_flight``: ``T`` for the batched modes,
1 for the loop, which frees each task's graph before the next) and GB per task, the peak
divided by the tasks in flight, given only where those are all ``T`` tasks (GB = 10⁹
bytes; a loop's peak is one task's, so it has none: dividing it by ``T`` would measure the
batch size, not memory). An out-of-memory configuration is recorded as ``"oom"`` and the
run goes on. Also: the loop/vmap time ratio, the peak memory ratio K=100 / K=1 of each
estimator, and any operation that ``vmap`` could not batch (it falls back to a loop over
tasks: a silent slowdown).

``per_task_memory`` in the JSON collects, for each batched mode, workload, estimator and
``K``, the peak at every meta-batch ``T`` run (``T`` tasks in flight), the peak / ``T``, the
growth per added task ``(peak(T) − peak(1)) / (T − 1)``, and beside them the
one-task-in-flight peaks: the same mode at ``T = 1`` and the loop at the same ``T``. Run it
with several meta-batches, e.g. ``--sine-meta-batches 1,2,4,8,16 --modes vmap,loop``.

The JSON's ``summary`` holds each target of docs/results/speed_memory.md with the measured value
and whether it is met; a GPU target is evaluated only in a CUDA run:

* Conv4-64, 5-way 1-shot, K=10, CG 5, meta-batch 32 (implicit, vmap): ≥ 200 tasks/s and
  ≤ 0.25 GB per task;
* implicit peak memory at K=100 ≤ 1.1 × at K=1 (Conv4, meta-batch 32, vmap; the explicit
  ratio beside it);
* sine, meta-batch 25, K=10, CG 5 (implicit, vmap): ≤ 10 ms per meta-iteration;
* on the CPU: the vmapped implicit sine meta-iteration ≥ 5 × faster than the loop.

    python -m benchmarks.scaling --device cuda --out runs/scaling           # the full grid
    python -m benchmarks.scaling --device cuda --modes vmap,compile,loop --compile-mode reduce-overhead
    nice -n 5 python -m benchmarks.scaling --workloads sine --sine-meta-batches 25 --steps 10 --estimators implicit
    python -m benchmarks.scaling --workloads sine --sine-meta-batches 1,2,4,8,16 --steps 10 --modes vmap,loop \
        --memory-repeats 3 --out runs/scaling_sine_per_task                 # per-task memory against T
    python -m benchmarks.scaling --quick                                    # a smoke run

Writes ``DIR/scaling.json`` and ``DIR/scaling.png`` and prints tables.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from . import _harness as H

TARGET_K, TARGET_CG = 10, 5


def _ints(text):
    return [int(v) for v in text.split(",") if v]


def _enable_vmap_fallback_warnings():
    fn = getattr(torch._C._functorch, "_set_vmap_fallback_warning_enabled", None)
    if fn is not None:
        fn(True)


def tasks_in_flight(learner, mode: str, T: int) -> int:
    """How many tasks one meta-iteration in ``mode`` holds at once: all ``T`` when vmapped
    (``"vmap"``, ``"compile"``, and ``"default"`` where the learner chooses vmap), one when
    looped (``"loop"``, and ``"default"`` where the learner chooses the loop)."""
    if mode == "loop":
        return 1
    if mode == "default":
        previous, learner.task_batching = learner.task_batching, "auto"
        try:
            return 1 if learner.batching() == "loop" else T
        finally:
            learner.task_batching = previous
    return T


def median_peak(fn, device, repeats: int):
    """``(median, all)`` of the peak bytes of ``repeats`` calls of ``fn`` (``H.peak_memory``);
    ``(None, None)`` where peak memory is not measurable."""
    peaks = [H.peak_memory(fn, device) for _ in range(max(1, repeats))]
    if any(p is None for p in peaks):
        return None, None
    return int(H.median(peaks)), peaks


def run_config(workload, T, estimator, K, modes, args, device, dtype):
    """Rows (one per mode) for one (workload, T, estimator, K)."""
    learner = H.build_learner(workload, estimator, K, args.cg_steps, device, dtype, hidden=args.hidden,
                              image_size=args.image_size, chunk_size=args.chunk_size)
    task = H.prepare(learner, H.make_batch(workload, T, dtype, device, image_size=args.image_size))
    base = {"workload": workload, "estimator": estimator, "K": K, "meta_batch": T, "cg_steps": args.cg_steps}
    rows, fns = {}, {}
    for mode in modes:
        row = dict(base, mode=mode, status="ok", ms=None, tasks_per_s=None, peak_bytes=None,
                   tasks_in_flight=tasks_in_flight(learner, mode, T), gb_per_task=None)
        fn = H.meta_iteration(learner, task, mode, args.compile_mode)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                for _ in range(args.warmup + (2 if mode == "compile" else 0)):
                    fn()
                H.synchronize(device)
                row["warmup_s"] = time.perf_counter() - t0
            row["vmap_fallbacks"] = sorted({str(w.message).split("\n")[0] for w in caught
                                            if "performance drop" in str(w.message)})
            row["peak_bytes"], row["peak_bytes_all"] = median_peak(fn, device, args.memory_repeats)
            fns[mode] = fn
        except (RuntimeError, H.OutOfMemoryError) as err:
            if not H.is_oom(err):
                raise
            row["status"] = "oom"
            H.release(device)
        rows[mode] = row
    budget = args.budget_s if args.budget_s > 0 else None
    try:
        times = H.time_interleaved(fns, device, args.repeats, warmup=0, budget_s=budget) if fns else {}
    except (RuntimeError, H.OutOfMemoryError) as err:
        if not H.is_oom(err):
            raise
        times = {}
        for mode in fns:
            rows[mode]["status"] = "oom"
        H.release(device)
    for mode, ts in times.items():
        row = rows[mode]
        row["ms"] = 1000 * H.median(ts)
        row["ms_all"] = [1000 * t for t in ts]
        row["tasks_per_s"] = T / H.median(ts)
        if row["peak_bytes"] is not None and row["tasks_in_flight"] == T:   # all T tasks held at once
            row["gb_per_task"] = row["peak_bytes"] / T / H.GB
    del learner, task, fns
    H.release(device)
    return [rows[m] for m in modes]


def _find(results, **key):
    for r in results:
        if all(r.get(k) == v for k, v in key.items()) and r["status"] == "ok":
            return r
    return None


def time_ratio(results, slow: str, fast: str, paired: bool = False):
    """``slow-mode ms / fast-mode ms`` (their medians) for every configuration that ran both
    modes; ``paired``: the median over the timed rounds of the two calls' ratio within a round
    (the modes run back to back in each round, so a round's ratio cancels the machine's drift)."""
    out = {}
    for r in results:
        if r["mode"] != fast or r["status"] != "ok":
            continue
        twin = _find(results, mode=slow, workload=r["workload"], estimator=r["estimator"], K=r["K"],
                     meta_batch=r["meta_batch"])
        if twin:
            key = f"{r['workload']}/{r['estimator']}/T={r['meta_batch']}/K={r['K']}"
            out[key] = (H.median([a / b for a, b in zip(twin["ms_all"], r["ms_all"])]) if paired
                        else twin["ms"] / r["ms"])
    return out


def memory_ratios(results, hi=100, lo=1):
    """Peak memory at K=hi over K=lo for each (workload, T, mode, estimator)."""
    out = {}
    keys = sorted({(r["workload"], r["meta_batch"], r["mode"], r["estimator"]) for r in results})
    for workload, T, mode, est in keys:
        a = _find(results, workload=workload, meta_batch=T, mode=mode, estimator=est, K=hi)
        b = _find(results, workload=workload, meta_batch=T, mode=mode, estimator=est, K=lo)
        if a and b and a["peak_bytes"] and b["peak_bytes"]:
            out[f"{workload}/T={T}/{mode}/{est}"] = a["peak_bytes"] / b["peak_bytes"]
    return out


def per_task_memory(results):
    """For each batched mode (all ``T`` tasks in flight), workload, estimator and ``K``: the
    peak at every meta-batch ``T``, the peak / ``T`` and the growth per added task, beside
    the one-task-in-flight peaks (the same mode at ``T = 1``, the loop at the same ``T``)."""
    out = {}
    keys = sorted({(r["workload"], r["estimator"], r["K"], r["mode"]) for r in results
                   if r["status"] == "ok" and r["peak_bytes"] is not None and r["tasks_in_flight"] == r["meta_batch"]
                   and r["mode"] != "loop"})
    for workload, estimator, K, mode in keys:
        same = dict(workload=workload, estimator=estimator, K=K)
        one = _find(results, mode=mode, meta_batch=1, **same)
        one_peak = one and one["peak_bytes"]
        rows = []
        for r in sorted((r for r in results if r["status"] == "ok" and r["peak_bytes"] is not None and r["mode"] == mode
                         and all(r[k] == v for k, v in same.items())), key=lambda r: r["meta_batch"]):
            T = r["meta_batch"]
            loop = _find(results, mode="loop", meta_batch=T, **same)
            rows.append({"meta_batch": T, "tasks_in_flight": r["tasks_in_flight"], "peak_bytes": r["peak_bytes"],
                         "bytes_per_task": r["peak_bytes"] / T, "gb_per_task": r["peak_bytes"] / T / H.GB,
                         "bytes_per_added_task": ((r["peak_bytes"] - one_peak) / (T - 1)
                                                  if one_peak is not None and T > 1 else None),
                         "one_task_in_flight_peak_bytes": {"same_mode_T1": one_peak,
                                                           "loop_same_T": loop and loop["peak_bytes"]}})
        out[f"{workload}/{estimator}/K={K}/{mode}"] = rows
    return out


def per_task_markdown(per_task) -> str:
    """``per_task_memory`` as a markdown table: for each batched configuration and ``T``, the
    peak of a meta-iteration holding ``T`` tasks in flight, that peak ÷ ``T`` (the memory per
    task), and the one-task-in-flight peaks beside it (the same mode at ``T = 1``, the loop at
    the same ``T``), which are never divided by the meta-batch. MiB = 2²⁰ bytes."""
    mib = lambda b: "—" if b is None else f"{b / 2 ** 20:.2f}"  # noqa: E731
    rows = []
    for key, entries in per_task.items():
        workload, estimator, K, mode = key.split("/")
        for e in entries:
            one = e["one_task_in_flight_peak_bytes"]
            rows.append([f"{workload} / {estimator}, {K}, {mode}", e["meta_batch"], mib(e["peak_bytes"]),
                         mib(e["bytes_per_task"]), mib(one["same_mode_T1"]), mib(one["loop_same_T"])])
    return H.markdown(["workload / estimator", "T", "peak MiB (T tasks in flight)", "peak ÷ T MiB",
                       "one task in flight: same mode at T=1, MiB", "one task in flight: loop at T, MiB"], rows)


def summarize(results, device, mem_ratio, ratio):
    """The specification's targets against this run's measurements."""
    summary = []
    modes = ["vmap"] + (["compile"] if any(r["mode"] == "compile" for r in results) else [])
    for mode in modes:
        conv = _find(results, workload="conv4", estimator="implicit", mode=mode, K=TARGET_K, meta_batch=32,
                     cg_steps=TARGET_CG)
        summary.append(H.target(f"conv4_tasks_per_s[{mode}]", f"Conv4-64 5-way 1-shot, K=10, CG 5, T=32, implicit "
                                f"{mode}: tasks/s", 200, conv and conv["tasks_per_s"], "higher", "cuda", device))
        summary.append(H.target(f"conv4_gb_per_task[{mode}]", f"same, peak GB per task ({mode})", 0.25,
                                conv and conv["gb_per_task"], "lower", "cuda", device))
        sine = _find(results, workload="sine", estimator="implicit", mode=mode, K=TARGET_K, meta_batch=25,
                     cg_steps=TARGET_CG)
        summary.append(H.target(f"sine_ms[{mode}]", f"sine MLP, T=25, K=10, CG 5, implicit {mode}: ms / meta-iteration",
                                10, sine and sine["ms"], "lower", "cuda", device))
        flat = mem_ratio.get(f"conv4/T=32/{mode}/implicit")
        explicit = mem_ratio.get(f"conv4/T=32/{mode}/explicit")
        note = f"explicit ratio in this run: {explicit:.3g}" if explicit else "explicit ratio not measured (or oom)"
        summary.append(H.target(f"implicit_memory_k100_over_k1[{mode}]", f"Conv4 T=32 implicit {mode}: peak memory "
                                "K=100 / K=1", 1.1, flat, "lower", "cuda", device, note=note))
    summary.append(H.target("cpu_vmap_speedup_sine", "CPU: sine T=25, K=10, CG 5, implicit: loop time / vmap time",
                            5, ratio.get(f"sine/implicit/T=25/K={TARGET_K}"), "higher", "cpu", device))
    return summary


def plot(results, path):
    """One row of panels per workload: time and peak memory against K (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w for w in H.WORKLOADS if any(r["workload"] == w for r in results)]
    fig, axes = plt.subplots(len(workloads), 2, figsize=(12, 4.2 * len(workloads)), squeeze=False)
    for row, workload in zip(axes, workloads):
        keys = sorted({(r["meta_batch"], r["estimator"], r["mode"]) for r in results if r["workload"] == workload})
        for key in keys:
            rows = sorted((r for r in results if r["workload"] == workload and r["status"] == "ok"
                           and (r["meta_batch"], r["estimator"], r["mode"]) == key), key=lambda r: r["K"])
            if not rows:
                continue
            style = "-" if key[1] == "implicit" else "--"
            label = f"T={key[0]} {key[1]} {key[2]}"
            row[0].plot([r["K"] for r in rows], [r["ms"] for r in rows], style, marker="o", label=label)
            mem = [(r["K"], r["peak_bytes"] / 2 ** 20) for r in rows if r["peak_bytes"] is not None]
            if mem:
                row[1].plot(*zip(*mem), style, marker="o", label=label)
        for ax, title in zip(row, ("time per meta-iteration (ms)", "peak memory of a meta-iteration (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("inner steps K")
            ax.set_title(f"{workload}: {title}")
            ax.grid(alpha=0.3, which="both")
        row[1].legend(fontsize=7, ncol=2)
    fig.suptitle("explicit (dashed) vs implicit (solid) meta-gradients")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    H.add_common_args(p, "runs/scaling")
    p.add_argument("--workloads", default="sine,conv4")
    p.add_argument("--steps", default="1,5,10,20,50,100", help="inner steps K")
    p.add_argument("--sine-meta-batches", default="4,25,32")
    p.add_argument("--conv4-meta-batches", default="4,32")
    p.add_argument("--estimators", default="explicit,implicit")
    p.add_argument("--modes", default="vmap,loop", help=f"any of {','.join(H.MODES)}")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode for --modes compile "
                   "(reduce-overhead: CUDA graphs)")
    p.add_argument("--cg-steps", type=int, default=TARGET_CG)
    p.add_argument("--hidden", type=int, default=64, help="Conv4 channels")
    p.add_argument("--image-size", type=int, default=84)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--memory-repeats", type=int, default=1, help="peak-memory calls per configuration (their median "
                   "is reported)")
    p.add_argument("--budget-s", type=float, default=60.0, help="stop the timed rounds of a configuration after "
                   "this many seconds (at least one round); 0: no limit")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.sine_meta_batches, args.conv4_meta_batches = "1,3", "4", "2"
        args.hidden, args.image_size, args.repeats, args.warmup = 4, 16, 1, 1
    device, dtype = H.setup(args)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in H.MODES:
            p.error(f"--modes: unknown mode {m!r}; expected {H.MODES}")
    _enable_vmap_fallback_warnings()
    batches = {"sine": _ints(args.sine_meta_batches), "conv4": _ints(args.conv4_meta_batches)}
    results = []
    for workload in args.workloads.split(","):
        if workload not in H.WORKLOADS:
            p.error(f"--workloads: unknown workload {workload!r}; expected {H.WORKLOADS}")
        for T in batches[workload]:
            for estimator in args.estimators.split(","):
                for K in _ints(args.steps):
                    for r in run_config(workload, T, estimator, K, modes, args, device, dtype):
                        results.append(r)
                        ms = "oom" if r["ms"] is None else f"{r['ms']:10.1f} ms"
                        mib = "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2 ** 20:9.1f} MiB"
                        print(f"{workload:5s} T={T:3d} {estimator:8s} {r['mode']:7s} K={K:4d} {ms} {mib}", flush=True)
    ratio = time_ratio(results, "loop", "vmap")
    compiled = time_ratio(results, "vmap", "compile")
    default_over_loop = time_ratio(results, "default", "loop")
    default_over_loop_paired = time_ratio(results, "default", "loop", paired=True)
    mem_ratio = memory_ratios(results)
    per_task = per_task_memory(results)
    summary = summarize(results, device, mem_ratio, ratio)
    fallbacks = sorted({m for r in results for m in r.get("vmap_fallbacks", [])})
    payload = {**H.environment(device), "memory_method": H.memory_method(device), "dtype": args.dtype,
               "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
               "conv4": {"hidden": args.hidden, "image_size": args.image_size, "ways": 5, "shots": 1, "query": 15},
               "results": results, "loop_over_vmap_time_ratio": ratio, "vmap_over_compile_time_ratio": compiled,
               "default_over_loop_time_ratio": default_over_loop,
               "default_over_loop_paired_time_ratio": default_over_loop_paired,
               "peak_memory_ratio_k100_over_k1": mem_ratio, "per_task_memory": per_task, "vmap_fallbacks": fallbacks,
               "summary": summary}
    out = Path(args.out)
    H.write_json(out, "scaling.json", payload)
    if results:
        plot(results, out / "scaling.png")
    rows = []
    for r in results:
        fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
        rows.append([r["workload"], r["meta_batch"], r["estimator"], r["mode"], r["K"],
                     "oom" if r["status"] == "oom" else fmt(r["ms"], ".1f"), fmt(r["tasks_per_s"], ".1f"),
                     fmt(r["peak_bytes"] and r["peak_bytes"] / 2 ** 20, ".1f"), r["tasks_in_flight"],
                     fmt(r["gb_per_task"], ".4f")])
    print()
    print(H.markdown(["workload", "T", "estimator", "mode", "K", "ms / meta-iter", "tasks/s", "peak MiB",
                      "tasks in flight", "GB / task"], rows))
    print("\nloop / vmap time:", {k: round(v, 2) for k, v in ratio.items()})
    if default_over_loop:
        print("default / loop time (medians; paired rounds):", {k: (round(v, 3), round(default_over_loop_paired[k], 3))
                                                                for k, v in default_over_loop.items()})
    if compiled:
        print("vmap / compile time:", {k: round(v, 2) for k, v in compiled.items()})
    print("peak memory K=100 / K=1:", {k: round(v, 2) for k, v in mem_ratio.items()})
    if fallbacks:
        print("vmap fell back to a loop for:", fallbacks)
    print()
    print(H.summary_table(summary))
    if any(len(v) > 1 for v in per_task.values()):
        print("\nmemory per task: the peak of a meta-iteration holding T tasks in flight ÷ T, beside the "
              "one-task-in-flight peaks (not divided):")
        print(per_task_markdown(per_task))
    return payload


if __name__ == "__main__":
    main()
