"""Shared pieces of the speed and memory benchmarks (``scaling``, ``overhead``, ``anchors``,
``precision``): the two workloads, one meta-iteration, timing and peak memory.

Workloads (both MAP inference with iMAML's isotropic prior ``N(μ, λ⁻¹I)``, ``λ = 100``, an
SGD inner loop with learning rate ``1e-3``, CG with the prior precision as preconditioner):

* ``sine``: the MLP 1-40-40-1, Gaussian likelihood with a learned noise, 10-shot tasks with
  10 query points, ``y = A sin(x − φ)``, ``A ∈ [0.1, 5]``, ``φ ∈ [0, π]``, ``x ∈ [−5, 5]``;
* ``conv4``: Conv4 with ``hidden`` channels (64 by default) on ``image_size``² RGB
  images (84 by default), 5-way 1-shot with 15 query images per class (random pixels:
  speed and memory do not depend on the pixel values).

A **meta-iteration** is what a training step does once the batch is on the device: the
mean meta-gradient over the ``T`` tasks of the batch, either ``torch.func.vmap`` over the
tasks (``"vmap"``: ``MetaLearner.meta_step`` itself, without host reads), the same vmapped
function under ``torch.compile`` (``"compile"``), a Python loop that calls the estimator once
per task (``"loop"``: ``MetaLearner.task_gradients`` with ``task_batching="loop"``), or
``meta_step`` with the learner's own per-device choice between the two (``"default"``,
``task_batching="auto"``: a loop for convolutions on the CPU),
followed by the meta-optimiser's update. The batch is validated and moved to the device once, before
timing, so the timed region holds no host synchronisation: on CUDA the only one is the
``torch.cuda.synchronize()`` that closes the measurement.

Timing: every function is warmed up, then the functions being compared run in turn,
``repeats`` rounds, each call bracketed by device synchronisation; the median is reported.
Running them in turn keeps the comparison fair on a machine whose load changes.

Peak memory of one call (after warm-up): on CUDA, ``torch.cuda.max_memory_allocated``
above the allocation before the call (model, data and optimiser state excluded). On the
CPU, the growth of the resident set size: free heap pages are returned to the system
(``malloc_trim``), the peak is reset (``/proc/self/clear_refs``), and the peak ``VmHWM``
after the call is compared with ``VmRSS`` before it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

import ibaml
import priors

OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
WORKLOADS = ("sine", "conv4")
MODES = ("vmap", "compile", "loop", "default")
GB = 1e9


def add_common_args(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs; 0 leaves the default)")
    p.add_argument("--chunk-size", type=int, default=None, help="tasks per vmap chunk (default: all at once)")
    p.add_argument("--quick", action="store_true", help="a small smoke run")
    p.add_argument("--out", default=out, help="output directory")


def setup(args) -> tuple:
    """``(device, dtype)`` from the parsed arguments; sets the thread count and cuDNN autotuning."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available in this torch build")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device, getattr(torch, args.dtype)


def environment(device: torch.device) -> dict:
    """What the numbers depend on, for the JSON."""
    env = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cudnn_benchmark=torch.backends.cudnn.benchmark,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    return env


# ---------------------------------------------------------------------------- workloads
def sine_batch(T: int, gen: torch.Generator, dtype, device, shots: int = 10, query: int = 10) -> Dict[str, torch.Tensor]:
    """``T`` sine tasks: ``support_x/y [T, shots, 1]``, ``query_x/y [T, query, 1]``."""
    amp = torch.rand(T, 1, 1, generator=gen, dtype=dtype) * 4.9 + 0.1
    phase = torch.rand(T, 1, 1, generator=gen, dtype=dtype) * math.pi
    x = torch.rand(T, shots + query, 1, generator=gen, dtype=dtype) * 10 - 5
    y = amp * torch.sin(x - phase)
    batch = {"support_x": x[:, :shots], "support_y": y[:, :shots], "query_x": x[:, shots:], "query_y": y[:, shots:]}
    return {k: v.contiguous().to(device) for k, v in batch.items()}


def image_batch(T: int, gen: torch.Generator, dtype, device, ways: int = 5, shots: int = 1, query: int = 15,
                size: int = 84) -> Dict[str, torch.Tensor]:
    """``T`` ``ways``-way ``shots``-shot episodes of random ``3 × size × size`` images:
    ``support_x [T, ways·shots, 3, size, size]``, ``query_x [T, ways·query, 3, size, size]``."""
    def part(n):
        x = torch.randn(T, ways * n, 3, size, size, generator=gen, dtype=dtype)
        y = torch.arange(ways).repeat_interleave(n).expand(T, -1).clone()
        return x, y

    sx, sy = part(shots)
    qx, qy = part(query)
    return {k: v.to(device) for k, v in dict(support_x=sx, support_y=sy, query_x=qx, query_y=qy).items()}


def make_batch(workload: str, T: int, dtype, device, image_size: int = 84, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    if workload == "sine":
        return sine_batch(T, gen, dtype, device)
    return image_batch(T, gen, dtype, device, size=image_size)


def make_net(workload: str, hidden: int = 64, image_size: int = 84) -> torch.nn.Module:
    from ibaml.core.nets import MLP, Conv4

    if workload == "sine":
        return MLP(1, (40, 40), 1)
    if workload == "conv4":
        return Conv4(in_channels=3, hidden=hidden, out_dim=5, image_size=image_size)
    raise ValueError(f"unknown workload {workload!r}; expected one of {WORKLOADS}")


def build_learner(workload: str, estimator: str, K: int, cg_steps: int, device, dtype, hidden: int = 64,
                  image_size: int = 84, chunk_size: Optional[int] = None, precision: float = 100.0,
                  inner_lr: float = 1e-3, cg_damping: float = 0.0, seed: int = 0) -> ibaml.MetaLearner:
    """The workload's :class:`ibaml.MetaLearner` with the ``"explicit"`` or ``"implicit"`` estimator."""
    torch.manual_seed(seed)
    net = make_net(workload, hidden, image_size).to(device=device, dtype=dtype)
    if workload == "sine":
        likelihood, num_classes = ibaml.GaussianLikelihood(1.0, learn_noise=True), None
    else:
        likelihood, num_classes = ibaml.CategoricalLikelihood(), 5
    likelihood = likelihood.to(device=device, dtype=dtype)
    prior = priors.IsotropicGaussian.from_module(net, precision=precision)
    if estimator == "explicit":
        est = ibaml.Explicit()
    elif estimator == "implicit":
        est = ibaml.Implicit(ibaml.core.linalg.CG(max_iter=cg_steps, damping=cg_damping))
    else:
        raise ValueError(f"unknown estimator {estimator!r}; expected 'explicit' or 'implicit'")
    return ibaml.MetaLearner(net, prior, likelihood, method="map", estimator=est,
                             inner_optimizer=ibaml.core.optim.SGD(lr=inner_lr), inner_steps=K, num_classes=num_classes,
                             chunk_size=chunk_size, task_batching="vmap")


# ---------------------------------------------------------------------------- one meta-iteration
def batched_meta_gradient(learner: ibaml.MetaLearner):
    """``(meta, task) -> mean over tasks of the estimator's meta-gradient``,
    ``MetaLearner.task_gradients`` with the tasks batched as ``learner.task_batching`` says
    (``"vmap"`` as :func:`build_learner` makes it: vmapped over tasks)."""
    def fn(meta, task):
        return {k: g.mean(0) for k, g in learner.task_gradients(task, meta).grads.items()}

    return fn


def meta_gradient_fn(learner: ibaml.MetaLearner, mode: str, compile_mode: str = "default"):
    """``(meta, task) -> mean meta-gradient`` in ``mode``: :func:`batched_meta_gradient` with
    ``task_batching="vmap"`` (``"vmap"``), the same under ``torch.compile`` (``"compile"``), or
    with ``task_batching="loop"``, one estimator call per task in a Python loop (``"loop"``).
    The batching is set for each call, outside the compiled function, and restored after it:
    the learner may be shared with the other modes (``meta_iteration``'s ``"default"`` sets
    ``"auto"``)."""
    if mode not in ("vmap", "compile", "loop"):
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    grad_fn = batched_meta_gradient(learner)
    if mode == "compile":
        grad_fn = torch.compile(grad_fn, mode=compile_mode)
    batching = "loop" if mode == "loop" else "vmap"

    def fn(meta, task):
        previous, learner.task_batching = learner.task_batching, batching
        try:
            return grad_fn(meta, task)
        finally:
            learner.task_batching = previous

    return fn


def meta_iteration(learner: ibaml.MetaLearner, task, mode: str = "vmap", compile_mode: str = "default") -> Callable:
    """A no-argument function running one meta-iteration (meta-gradient, then the
    meta-optimiser's step) on the prepared ``task`` (see :func:`prepare`): for ``"vmap"``
    ``learner.meta_step(task, validate=False, check=False)`` itself (no host read, the
    non-finite policy by masks), for ``"compile"`` and ``"loop"`` the same mean
    meta-gradient computed that way and the optimiser's step."""
    if mode in ("vmap", "default"):   # the library's own meta-step, without host reads
        batching = "vmap" if mode == "vmap" else "auto"

        def library_step():
            learner.task_batching = batching   # "default": the learner's own per-device choice
            learner.meta_step(task, validate=False, check=False)

        return library_step
    grad_fn = meta_gradient_fn(learner, mode, compile_mode)
    params = learner.model.meta_parameters()
    # Under CUDA graphs (compile mode "reduce-overhead") a call's outputs live in the graph's
    # memory until the next call: mark each call as a new step (a no-op otherwise).
    new_step = getattr(torch.compiler, "cudagraph_mark_step_begin", None) if mode == "compile" else None

    def step():
        if new_step is not None:
            new_step()
        grads = grad_fn(learner.meta_params(), task)
        for k, p in params.items():
            p.grad = grads[k]
        learner.meta_optimizer.step()

    return step


def prepare(learner: ibaml.MetaLearner, batch) -> Dict[str, torch.Tensor]:
    """The batch validated and on the learner's device and dtype (done once, outside timing)."""
    return learner.prepare(batch)


# ---------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Dict[str, Callable], device: torch.device, repeats: int, warmup: int = 1,
                     budget_s: Optional[float] = None) -> Dict[str, list]:
    """Seconds per call of each function: ``warmup`` calls each, then ``repeats`` rounds in
    which every function runs once, each call between two device synchronisations. With
    ``budget_s``, the rounds stop early (after at least one) once the measured rounds have
    taken that long."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times = {name: [] for name in fns}
    start = time.perf_counter()
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return times


def median(xs) -> float:
    return float(statistics.median(xs))


_VIEWS = {"view", "_unsafe_view", "expand", "transpose", "t", "permute", "slice", "select", "unsqueeze", "squeeze",
          "as_strided", "alias", "detach", "reshape", "unbind", "split", "split_with_sizes", "lift_fresh"}


def count_operators(fn: Callable) -> Dict[str, int]:
    """Operators that one call of ``fn`` dispatches to kernels (after ``vmap`` has batched
    them): ``{"total": n, "compute": n without views, <op>: n, ...}``. On a GPU every
    compute operator is at least one kernel launch, so this counts the launches that bound a
    small meta-iteration; unlike a time, it does not depend on the machine's load."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with _Count() as mode:
        fn()
    counts = mode.counts
    compute = sum(n for op, n in counts.items() if op not in _VIEWS)
    return {"total": sum(counts.values()), "compute": compute, **dict(counts.most_common())}


# ---------------------------------------------------------------------------- peak memory
_STATUS = "/proc/self/status"


def _proc_kib(field: str) -> int:
    with open(_STATUS) as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def cpu_peak_supported() -> bool:
    """Whether the kernel lets a process reset its resident-set high-water mark (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _proc_kib("VmHWM")
        return True
    except (OSError, AttributeError):
        return False


def reset_cpu_peak() -> int:
    """Return freed heap to the system (``malloc_trim``), reset the high-water mark ``VmHWM``
    to the current resident set (``clear_refs`` 5), and return that resident set in bytes."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return 1024 * _proc_kib("VmRSS")


def cpu_peak_bytes() -> int:
    """The resident-set high-water mark ``VmHWM`` since the last :func:`reset_cpu_peak`, in bytes."""
    return 1024 * _proc_kib("VmHWM")


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated above the allocation before the call"
    if cpu_peak_supported():
        return "peak resident set size (VmHWM after malloc_trim and a clear_refs reset) above VmRSS before the call"
    return "unavailable (no /proc/self/clear_refs)"


def peak_memory(fn: Callable, device: torch.device) -> Optional[int]:
    """Bytes of memory that one call of ``fn`` needs above what is allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    if not cpu_peak_supported():
        fn()
        return None
    base = reset_cpu_peak()
    fn()
    return max(0, cpu_peak_bytes() - base)


def cpu_tensor_peak(fn: Callable) -> int:
    """Bytes of tensor memory that one call of ``fn`` holds at its peak above what is allocated
    before it, on the CPU: the CPU allocator's allocations ``+b`` and frees ``−b`` during the call,
    as the profiler records them (``torch.profiler`` with ``profile_memory=True``), in time
    order, and the highest running sum ``max_t Σ_{s ≤ t} b_s`` (``0`` if nothing is allocated).

    The tensor-level count that ``torch.cuda.max_memory_allocated`` gives on CUDA: unlike the
    resident set, it does not move with the allocator's caching and fragmentation or with Python
    objects, so two calls of the same work give the same number.

    >>> cpu_tensor_peak(lambda: torch.ones(1000) * 2) >= 8000   # two float32 buffers of 1000
    True
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    held = peak = 0
    for _, nbytes in changes:
        held += nbytes
        peak = max(peak, held)
    return peak


def is_oom(err: BaseException) -> bool:
    return isinstance(err, OutOfMemoryError) or "out of memory" in str(err).lower()


def release(device: torch.device) -> None:
    """Return cached device memory between configurations."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- reporting
def target(name: str, description: str, threshold: float, measured: Optional[float], better: str, applies_to: str,
           device: torch.device, note: str = "") -> dict:
    """One entry of a JSON ``summary``: whether ``measured`` meets ``threshold``
    (``better`` is ``"higher"`` or ``"lower"``). ``met`` is ``None`` when the value was not
    measured, or when the target is for another kind of device (``applies_to``: ``"cuda"``
    or ``"cpu"``) than the one the run used."""
    entry = {"target": name, "description": description, "threshold": threshold, "better": better,
             "applies_to": applies_to, "measured": measured, "met": None}
    if measured is None:
        entry["note"] = note or "not measured in this run"
    elif applies_to != device.type:
        entry["note"] = f"a {applies_to} target; this run used {device.type}, so it is not evaluated"
    else:
        entry["met"] = bool(measured >= threshold if better == "higher" else measured <= threshold)
        if note:
            entry["note"] = note
    return entry


def summary_table(summary: list) -> str:
    lines = ["| target | threshold | measured | met |", "|---|---|---|---|"]
    for e in summary:
        sign = "≥" if e["better"] == "higher" else "≤"
        value = "—" if e["measured"] is None else f"{e['measured']:.4g}"
        met = {True: "yes", False: "**no**", None: "n/a"}[e["met"]]
        lines.append(f"| {e['description']} | {sign} {e['threshold']:g} | {value} | {met} |")
    return "\n".join(lines)


def write_json_file(path: Path, payload) -> Path:
    """``payload`` as indented JSON at ``path``, its folder made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path


def write_json(out: Path, name: str, payload: dict) -> Path:
    return write_json_file(Path(out) / name, payload)


def markdown(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
