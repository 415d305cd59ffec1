"""The terminal: a bar in a terminal, plain lines in a pipe, the summary, help, the seed example."""

import os
import pty
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli, cli_env
from mlflow.tracking import MlflowClient
from torch import nn

from bpexp.names import diagnosis_change

pytestmark = pytest.mark.slow


def test_a_terminal_shows_a_live_bar(tmp_path):
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        cli("tracking=none", "train.steps=400", f"hydra.run.dir={tmp_path}"),
        stdin=follower, stdout=follower, stderr=follower, env=cli_env(), cwd=tmp_path, close_fds=True,
    )  # fmt: skip
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=120) == 0
    screen = b"".join(chunks).decode()
    assert "\r" in screen and "█" in screen and "400/400 steps" in screen
    assert "bpexp run digits-d4w64-relu-kaiming_normal-adam-s0" in screen


def test_a_pipe_gets_plain_lines_and_the_summary_holds_the_runs_numbers(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    done = subprocess.run(
        cli(f"tracking.uri={store}", "train.steps=400", f"hydra.run.dir={tmp_path}/out"),
        capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    bar = [line for line in done.stderr.splitlines() if "steps," in line]
    assert "\r" not in done.stderr and 2 <= len(bar) <= 8
    assert bar[-1].startswith("digits-d4w64-relu-kaiming_normal-adam-s0: 100% 400/400 steps")
    assert "INFO mlflow" not in done.stderr  # MLflow's migrations chatter is kept out of the way

    run = MlflowClient(store).search_runs(["1"])[0]
    m = run.data.metrics
    out = done.stdout
    tags = run.data.tags  # both states: at initialization → at the end (one word when they agree)
    state = diagnosis_change(tags["bpexp.diagnosis_init"], tags["bpexp.diagnosis"])
    assert f"({run.info.run_id}): completed, {state}" in out
    assert f"val/loss {m['val/loss']:.4g}" in out and f"val/acc {m['val/acc']:.4g}" in out
    assert f"10^{m['delta/log10_ratio']:+.2f} after training" in out
    assert f"theory 10^{m['theory/delta_log10_ratio']:+.2f}" in out
    assert f"#/experiments/1/runs/{run.info.run_id}?workflowType=machine_learning" in out
    assert f"--backend-store-uri {store}" in out
    assert run.data.tags["mlflow.note.content"].startswith("bpexp run digits-d4w64")


def test_help_lists_every_group_and_examples(tmp_path):
    done = subprocess.run(cli("--help"), capture_output=True, text=True, env=cli_env(), cwd=tmp_path)
    assert done.returncode == 0
    for group in ("data:", "model:", "optim:", "probes:", "tracking:", "experiment:"):
        assert group in done.stdout
    assert "python -m bpexp.train -m model.depth=2,8,32" in done.stdout
    assert "python -m bpexp.train -m experiment=vanishing" in done.stdout
    assert "model.activation=relu" in done.stdout


def test_console_scripts_and_completion(tmp_path):
    script = Path(sys.executable).with_name("bpexp-train")
    assert script.exists() and shutil.which("bpexp-report", path=str(script.parent))
    line = "bpexp-train optim=ad"
    env = {**cli_env(), "COMP_LINE": line, "COMP_POINT": str(len(line))}
    done = subprocess.run(
        [str(script), "-sc", "query=bash"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert set(done.stdout.split()) == {"optim=adagrad", "optim=adam", "optim=adamw"}


def test_the_seed_example_prints_the_hand_computed_loss(tmp_path):
    done = subprocess.run(
        cli("experiment=seed_example", "tracking=none", f"hydra.run.dir={tmp_path}"),
        capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    printed = float(re.search(r"train/loss (\S+) at step 0", done.stdout).group(1))
    # The explainer's snippet with the same seed: data from a generator seeded 0, init from torch's seed 0.
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(5, 3, generator=g, dtype=torch.float64),
        torch.randn(5, 1, generator=g, dtype=torch.float64),
    )
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    loss = nn.MSELoss()(net(x.float()), y.float())
    assert printed == pytest.approx(loss.item(), rel=1e-3)  # printed to 4 significant digits
