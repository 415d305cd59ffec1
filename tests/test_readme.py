"""The README's sample outputs are what the current code prints, so they cannot drift from it.

Every plain fenced block that starts with `$ python -m bpexp.train` is run as written, in a fresh folder
(its own ./mlflow.db), and compared line by line with what the README shows: run ids, paths and times
masked, every other number equal to the digits shown (one unit of the last digit of slack: same seed,
same numbers with the pinned torch build). Every ```python snippet runs as pasted into a file; one that
ends in `# ` comment lines must print them.
"""

import re
import subprocess
import sys

import pytest
from conftest import ROOT, cli, cli_env

pytestmark = pytest.mark.slow

README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
COMMAND = "$ python -m bpexp.train"
MASKS = [
    (re.compile(r"\b[0-9a-f]{32}\b"), "<run id>"),
    (re.compile(r"in \d+\.\d s$"), "in <t> s"),
    (re.compile(r"(artifacts: )\S+"), r"\1<folder>"),
    (re.compile(r"(--backend-store-uri )\S+,"), r"\1<uri>,"),
]
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README) if lang == language]


def examples() -> list[tuple[str, list[str]]]:
    """(command, the lines the README shows it printing); a block may hold several, a blank line apart."""
    found = []
    for body in blocks(""):
        if body.startswith(COMMAND):
            for chunk in body.strip().split("\n\n"):
                command, *lines = chunk.splitlines()
                found.append((command.removeprefix("$ ").split("  #")[0].strip(), lines))
    return found


def mask(line: str) -> str:
    for pattern, replacement in MASKS:
        line = pattern.sub(replacement, line)
    return line.rstrip()


def tolerance(shown: str) -> float:
    """One unit of the last digit shown: 0.00387 -> 1e-05, 1.2e-05 -> 1e-06, 300 -> 0 (integers exact)."""
    mantissa, _, exponent = shown.lower().partition("e")
    if "." not in mantissa:
        return 0.0
    return 10.0 ** (int(exponent or 0) - len(mantissa.partition(".")[2]))


def agrees(shown: str, printed: str) -> bool:
    shown, printed = mask(shown), mask(printed)
    if NUMBER.sub("#", shown) != NUMBER.sub("#", printed):
        return False
    pairs = zip(NUMBER.findall(shown), NUMBER.findall(printed), strict=True)
    return all(abs(float(a) - float(b)) <= tolerance(a) * (1 + 1e-9) for a, b in pairs)


def assert_shows(shown: list[str], printed: list[str]) -> None:
    """Each line shown agrees with the printed one; the README may leave off the last printed lines."""
    assert len(printed) >= len(shown), printed
    for a, b in zip(shown, printed, strict=False):
        assert agrees(a, b), f"README: {a}\nprinted: {b}"


def run(command: str, cwd) -> subprocess.CompletedProcess:
    args = command.split()
    assert args[:3] == ["python", "-m", "bpexp.train"], command
    done = subprocess.run(cli(*args[3:]), capture_output=True, text=True, timeout=300, env=cli_env(), cwd=cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_the_readme_has_checked_examples():
    commands = [command for command, _ in examples()]
    assert "python -m bpexp.train" in commands and "python -m bpexp.train experiment=seed_example" in commands
    assert len(blocks("python")) >= 2


@pytest.mark.parametrize(("command", "shown"), examples(), ids=[c for c, _ in examples()])
def test_a_readme_command_prints_what_the_readme_shows(tmp_path, command, shown):
    lines = run(command, tmp_path).stdout.splitlines()
    summary = next(i for i, line in enumerate(lines) if line.startswith("bpexp run "))
    assert_shows(shown, lines[summary:])


def test_the_readme_python_snippets_run_as_pasted(tmp_path):
    run("python -m bpexp.train experiment=seed_example", tmp_path)  # what the seed's snippet reads
    run("python -m bpexp.train -m model.depth=2,8 model.activation=tanh train.steps=10", tmp_path)  # a sweep
    for i, snippet in enumerate(blocks("python")):
        file = tmp_path / f"snippet{i}.py"
        file.write_text(snippet)
        done = subprocess.run(
            [sys.executable, file], capture_output=True, text=True, timeout=120, env=cli_env(), cwd=tmp_path
        )
        assert done.returncode == 0, f"{snippet}\n{done.stderr[-2000:]}"
        assert done.stdout.strip(), f"prints nothing:\n{snippet}"
        lines, shown = snippet.rstrip().splitlines(), []
        while lines[-1].startswith("#"):  # the output it prints, as trailing comments
            shown.insert(0, lines.pop().removeprefix("#").removeprefix(" "))
        if shown:
            assert_shows(shown, done.stdout.splitlines())


def test_masks_and_digits():
    shown = "  train/loss 2.722 at step 0, 0.00387 at the end, val/acc 0.9647; 300 steps in 2.1 s"
    assert agrees(
        shown, "  train/loss 2.722 at step 0, 0.00388 at the end, val/acc 0.9647; 300 steps in 9.9 s"
    )
    assert not agrees(
        shown, "  train/loss 2.722 at step 0, 0.00389 at the end, val/acc 0.9647; 300 steps in 2.1 s"
    )
    assert not agrees(
        shown, "  train/loss 2.722 at step 0, 0.00387 at the end, val/acc 0.9647; 301 steps in 2.1 s"
    )
    assert not agrees(shown, "  train/loss 2.722 at step 0, 0.00387 at the end; 300 steps in 2.1 s")
    assert agrees("run a (0123456789abcdef0123456789abcdef)", "run a (fedcba9876543210fedcba9876543210)")
