"""Progress bars: redrawn once a minute when the output is a log file, not once per step."""

import contextlib
import io

from ibaml.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def draws(stream, steps=500):
    with contextlib.redirect_stdout(stream):
        bar = progress_bar(range(steps), True, desc="meta-train")
        for _ in bar:
            pass
        interval = bar.mininterval
        bar.close()
    return interval, stream.getvalue().count("\r")


def test_a_log_file_gets_one_line_a_minute_and_a_terminal_a_live_bar():
    log_interval, log_draws = draws(io.StringIO())
    assert log_interval == 60.0 and log_draws <= 3          # the first and the last state only
    term_interval, _ = draws(Terminal())
    assert term_interval == 1.0


def test_disabled_bar_writes_nothing():
    stream = io.StringIO()
    with contextlib.redirect_stdout(stream):
        assert sum(progress_bar(range(4), False)) == 6
    assert stream.getvalue() == ""
