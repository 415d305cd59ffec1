import io

from bpexp.progress import Progress, duration


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_pipe_gets_a_few_plain_lines_not_a_flood():
    out = io.StringIO()
    bar = Progress(10_000, "run", stream=out, interval=3600)
    for step in range(1, 10_001):
        bar.update(step, loss=f"{1 / step:.3f}")
    bar.close()
    lines = out.getvalue().splitlines()
    assert 4 <= len(lines) <= 6  # the first update, each quarter, the close
    assert "\r" not in out.getvalue()
    assert lines[-1].startswith("run: 100% 10000/10000 steps") and lines[-1].endswith("loss 0.000")


def test_a_terminal_gets_one_line_redrawn_in_place():
    out = Terminal()
    bar = Progress(50, "run", stream=out, fps=1e9)
    for step in range(1, 51):
        bar.update(step, δ="10^-0.3")
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 50  # one redraw per update
    assert text.endswith("\n") and text.count("\n") == 1  # close only ends the line
    assert "█" * 20 in text and "50/50 steps" in text and "δ 10^-0.3" in text


def test_duration():
    assert duration(5) == "0:05" and duration(125) == "2:05" and duration(3725) == "1:02:05"
