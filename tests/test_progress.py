"""Progress: a live bar on a terminal; plain lines with the right counter in a log file."""

import contextlib
import io
import re

import pytest
import torch

from ibaml.train.progress import ProgressLines, progress_bar

LINE = re.compile(r"^meta-train: (\d+)/(\d+) \((\d+)%\), (\d+:\d\d) elapsed, [\d.]+ it/s, "
                  r"(ETA \d+:\d\d|done), loss=([\d.]+)$")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def logged(steps=300, start=0, **kwargs):
    """What a loop of ``steps`` with a loss postfix writes to a redirected stdout."""
    stream = io.StringIO()
    with contextlib.redirect_stdout(stream):
        bar = progress_bar(range(start, steps), True, initial=start, total=steps, desc="meta-train", **kwargs)
        for i in bar:
            bar.set_postfix({"loss": f"{1 / (i + 1):.3f}"})
        bar.close()
    return stream.getvalue()


def test_a_log_file_gets_a_plain_line_every_five_percent_with_the_counter_eta_and_loss():
    text = logged(300)
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert len(lines) == 20                                             # 5 %, 10 %, ..., 95 %, then the end
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    counts = [int(m.group(1)) for m in parsed]
    assert counts == list(range(15, 300, 15)) + [300]
    assert all(int(m.group(2)) == 300 for m in parsed)
    assert [int(m.group(3)) for m in parsed] == list(range(5, 100, 5)) + [100]
    assert all(m.group(5).startswith("ETA") for m in parsed[:-1]) and parsed[-1].group(5) == "done"
    # the postfix is the one set at the step the line counts
    assert [float(m.group(6)) for m in parsed] == [float(f"{1 / c:.3f}") for c in counts]


def test_a_resumed_loop_counts_from_where_it_starts():
    lines = logged(300, start=200).splitlines()
    counts = [int(LINE.match(line).group(1)) for line in lines]
    assert counts == list(range(210, 300, 15)) + [300]


def test_lines_come_by_time_too_and_a_transient_loop_writes_only_those():
    ticks = iter(range(0, 10_000, 7))                                   # 7 s a step
    log = io.StringIO()
    bar = ProgressLines(range(40), desc="evaluate", leave=False, interval=60, file=log, clock=lambda: next(ticks))
    for _ in bar:
        pass
    lines = log.getvalue().splitlines()
    counters = [int(re.match(r"evaluate: (\d+)/40 ", line).group(1)) for line in lines]
    assert counters == [9, 18, 27, 36, 40]                              # every 63 s, then the end
    quiet = io.StringIO()
    for _ in ProgressLines(range(40), leave=False, file=quiet):         # fast: nothing at all
        pass
    assert quiet.getvalue() == ""


def test_a_loop_without_a_length_writes_its_counter():
    log = io.StringIO()
    ticks = iter(range(0, 1000, 30))
    bar = ProgressLines(iter(range(5)), desc="stream", interval=60, file=log, clock=lambda: next(ticks))
    for _ in bar:
        pass
    assert log.getvalue().splitlines()[-1].startswith("stream: 5, ") and log.getvalue().count("\n") == 3


def test_fit_logs_its_progress_as_lines(tmp_path):
    from ibaml import build_learner, GaussianLikelihood
    from ibaml.train import training
    from ibaml.data.sine import SineTaskDistribution
    from ibaml.core.nets import MLP

    learner = build_learner("maml", MLP(1, (8,), 1), GaussianLikelihood(1.0))
    tasks, gen = SineTaskDistribution(shots=5), torch.Generator().manual_seed(0)
    stream = io.StringIO()
    with contextlib.redirect_stdout(stream):
        training.fit(learner, lambda: tasks.sample(2, gen), 40, folder=tmp_path, desc="maml")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 20
    assert lines[0].startswith("maml: 2/40 (5%)") and "loss=" in lines[0]
    assert lines[-1].startswith("maml: 40/40 (100%)") and ", done, loss=" in lines[-1]


def test_a_terminal_gets_a_live_bar():
    stream = Terminal()
    with contextlib.redirect_stdout(stream):
        bar = progress_bar(range(5), True, desc="meta-train")
        for _ in bar:
            pass
        bar.close()
    assert bar.mininterval == 1.0 and "\r" in stream.getvalue() and "5/5" in stream.getvalue()


def test_disabled_progress_writes_nothing():
    stream = io.StringIO()
    with contextlib.redirect_stdout(stream):
        assert sum(progress_bar(range(4), False)) == 6
    assert stream.getvalue() == ""


def test_options_are_checked():
    with pytest.raises(ValueError, match="every_percent"):
        ProgressLines(range(3), every_percent=0)
