"""The MLflow UI (mlflow 3.17) in a real browser: what bpexp logs is usable where people look at it.

One small sweep (three SGD learning rates on the teacher task, depth 3; η = 1e4 diverges) goes into a
fresh SQLite store; `mlflow server` serves that store on 127.0.0.1; headless Chromium, driven by
Playwright, opens the pages and the tests read what they show: the training view, the sweep as one
parent row, the per-layer chart groups in layer order, the diverged run's tags, the artifacts.

Screenshots land in <pytest tmp>/ui0/screenshots (or in $BPEXP_SCREENSHOTS): look at them.
docs/run_page.png is screenshots/run_page.png.

Needs a Chromium or Chrome on the machine (Debian: `apt-get install chromium`; or $BPEXP_CHROMIUM);
Playwright's own browser download is not used. Without one the tests skip, except under CI=… where
they fail. Selectors are the page's roles, texts, links and MLflow's own data-testids.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
from conftest import cli, cli_env
from mlflow.tracking import MlflowClient

from bpexp.server import stop_server

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the browser fixture skips (or, under CI, fails) with the reason
    expect = sync_playwright = None

pytestmark = pytest.mark.slow

DEPTH = 3
LAYERS = [f"l{layer:03d}" for layer in range(1, DEPTH + 2)]  # L = depth + 1 Linear layers
SWEEP = [
    "optim=sgd",
    "optim.lr=0.01,0.1,1e4",
    "data=teacher",
    "train.steps=30",
    f"model.depth={DEPTH}",
    "probes.noise=true",  # the instruments' chart groups: grad_noise/, gns/, gsnr/, jacobian/, sharpness/
    "probes.sharpness_every=10",
]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 900}  # also the size of docs/run_page.png
PAGE_TIMEOUT_MS = 30_000  # one page of a React app on a busy 2-core machine
RUN_SEARCH = 'metrics.rmse < 1 and params.model = "tree"'  # the placeholder of the runs search box
MLFLOW_3_17_TRAINING = "workflowType=machine_learning"  # see test_the_experiment_opens_in_the_training_view


@dataclass
class Sweep:
    """The store, as MLflow's API reports it: the ground truth that the pages are checked against."""

    folder: Path
    uri: str
    experiment_id: str
    parent: str
    children: list[str]
    diverged: str
    completed: str  # a child that completed (η = 0.1)


# --------------------------------------------------------------------------------------------------
# Fixtures: one sweep, one server, one browser for the module; a fresh browser context per test


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Sweep:
    folder = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{folder}/mlflow.db"
    done = subprocess.run(
        cli("-m", *SWEEP, f"tracking.uri={uri}", f"hydra.sweep.dir={folder}/multirun"),
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env(),
        cwd=folder,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("bpexp")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 3
    by_lr = {float(r.data.params["optim.lr"]): r for r in children}
    assert by_lr[1e4].data.tags["bpexp.outcome"] == "diverged"
    assert by_lr[0.1].data.tags["bpexp.outcome"] == "completed"
    return Sweep(
        folder=folder,
        uri=uri,
        experiment_id=experiment.experiment_id,
        parent=parents[0].info.run_id,
        children=[r.info.run_id for r in children],
        diverged=by_lr[1e4].info.run_id,
        completed=by_lr[0.1].info.run_id,
    )


@pytest.fixture(scope="module")
def server(sweep) -> Iterator[str]:
    """`mlflow server` on the sweep's store. Artifacts need no flag: the experiment's artifact location
    is an absolute file:// folder beside the store, and the server reads it for the UI."""
    port = free_port()
    log = (sweep.folder / "server.log").open("w")
    env = {**cli_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: ~8 s to start
    command = ["mlflow", "server", "--backend-store-uri", sweep.uri, "--host", "127.0.0.1"]
    process = subprocess.Popen(
        [sys.executable, "-m", *command, "--port", str(port), "--workers", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=sweep.folder,
        start_new_session=True,  # its own process group: stopping it stops its uvicorn worker too
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, process, sweep.folder / "server.log")
        yield base
    finally:
        stop_server(process, timeout=30)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    executable = find_chromium()
    if sync_playwright is None:
        unavailable("the playwright package is not installed (pip install playwright)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def screenshots(sweep) -> Path:
    folder = Path(os.environ.get("BPEXP_SCREENSHOTS") or sweep.folder / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser, server, screenshots, request) -> Iterator[object]:
    """A page in a fresh context (nothing in localStorage: a first visit); it fails the test on a
    JavaScript error or a server error, and leaves a screenshot named after the test either way."""
    expect.set_options(timeout=PAGE_TIMEOUT_MS)
    context = browser.new_context(viewport=VIEWPORT, base_url=server)
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(f"JavaScript: {error}"))
    page.on("response", lambda r: errors.append(f"HTTP {r.status} {r.url}") if r.status >= 500 else None)
    yield page
    page.screenshot(path=screenshots / f"{request.node.name}.png")
    context.close()
    assert errors == []


# --------------------------------------------------------------------------------------------------
# Tests


def test_the_experiment_opens_in_the_training_view(page, sweep):
    """MLflow 3.17's UI picks GenAI or Model training from its sidebar switch (kept in localStorage,
    GenAI on a first visit) or from ?workflowType=…, not from the experiment's mlflow.experimentKind
    tag: a link for people must carry workflowType=machine_learning."""
    kind = MlflowClient(sweep.uri).get_experiment(sweep.experiment_id).tags.get("mlflow.experimentKind")
    assert kind == "custom_model_development"

    page.goto(f"/#/experiments/{sweep.experiment_id}?{MLFLOW_3_17_TRAINING}")
    expect(page).to_have_url(re.compile(rf"#/experiments/{sweep.experiment_id}/runs\b"))
    expect(run_link(page, sweep.parent)).to_be_visible()
    expect(page.get_by_text("Overview", exact=True)).to_have_count(0)  # the GenAI side nav is not shown

    # The plain link, on a first visit, lands on the GenAI overview under an onboarding tip (why the
    # link needs the parameter); dismissing the tip and one click on the sidebar switch reach the table.
    page.goto(f"/#/experiments/{sweep.experiment_id}")
    expect(page).to_have_url(re.compile(r"/overview\b.*workflowType=genai"))
    page.get_by_role("button", name="Got it", exact=True).click()
    page.get_by_role("button", name="Model training", exact=True).click()
    expect(page).to_have_url(re.compile(rf"#/experiments/{sweep.experiment_id}/runs\b"))
    expect(run_link(page, sweep.parent)).to_be_visible()


def test_the_sweep_is_one_parent_row_that_expands_to_its_children(page, sweep, screenshots):
    page.goto(f"/#/experiments/{sweep.experiment_id}?{MLFLOW_3_17_TRAINING}")
    expect(run_link(page, sweep.parent)).to_be_visible()
    for child in sweep.children:
        expect(run_link(page, child)).to_have_count(0)
    expect(page.get_by_text(re.compile(r"^4 matching runs$"))).to_be_visible()

    expand_children(page, sweep.parent)
    for child in sweep.children:
        expect(run_link(page, child)).to_be_visible()
    page.screenshot(path=screenshots / "runs_table.png")


def test_runs_filter_by_the_outcome_tag_and_by_a_dotted_param(page, sweep):
    """`tags.bpexp.outcome` and `params.optim.lr` work unquoted in the search box (MLflow splits at the
    first dot); metric keys with '/' need backticks there: metrics.`val/loss` < 0.2."""
    page.goto(f"/#/experiments/{sweep.experiment_id}?{MLFLOW_3_17_TRAINING}")
    expand_children(page, sweep.parent)  # once: the table keeps a parent expanded across searches
    for query, expected in [
        ("tags.bpexp.outcome = 'diverged'", sweep.diverged),
        ("params.optim.lr = '0.1'", sweep.completed),
    ]:
        box = page.get_by_placeholder(RUN_SEARCH)
        box.fill(query)
        box.press("Enter")
        for other in set(sweep.children) - {expected}:
            expect(run_link(page, other)).to_have_count(0)
        expect(run_link(page, expected)).to_be_visible()
        expect(page.get_by_text(re.compile(r"^2 matching runs$"))).to_be_visible()  # the child, its parent


def test_a_run_page_shows_the_per_layer_chart_groups_in_layer_order(page, sweep, screenshots):
    page.goto(f"/#/experiments/{sweep.experiment_id}/runs/{sweep.completed}?{MLFLOW_3_17_TRAINING}")
    page.get_by_role("tab", name="Model metrics").click()
    close_assistant(page)
    headers = page.get_by_test_id("experiment-view-compare-runs-section-header")
    for group in ("grad_norm", "delta_norm", "update_ratio", "train", "val"):
        expect(section(page, group)).to_have_count(1)
    for group in ("grad_noise", "gns", "gsnr", "jacobian", "sharpness"):  # the instruments
        expect(section(page, group)).to_have_count(1)

    search = page.get_by_placeholder("Search metric charts")
    groups = [("grad_norm", ["total"]), ("update_ratio", []), ("delta_norm", []), ("grad_noise", ["total"])]
    for group, extra in groups:
        search.fill(f"{group}/")  # this group's charts only (grad_norm_b/… does not contain "grad_norm/")
        expect(headers).to_have_count(1)
        expect(headers.first).to_contain_text(f"{group}({len(LAYERS) + len(extra)})")
        titles = charts(page).locator("h4")
        expect(titles).to_have_text(LAYERS + extra)  # one chart per layer, l001 … l00L, in layer order
        expect_drawn(page, len(LAYERS) + len(extra))
        page.screenshot(path=screenshots / f"charts_{group}.png")
    page.screenshot(path=screenshots / "run_page.png")  # docs/run_page.png: δ^(l) per layer


def test_the_diverged_run_is_tagged_and_its_pages_load(page, sweep, screenshots):
    """NaN/inf must never reach the store: MLflow 3.17 silently leaves out of the run page a metric whose
    latest value is NaN (and its NaN points out of charts) and shows inf as 1.8e308; bpexp filters
    non-finite values and records the divergence as tags."""
    page.goto(f"/#/experiments/{sweep.experiment_id}/runs/{sweep.diverged}?{MLFLOW_3_17_TRAINING}")
    expect(tag(page, "bpexp.outcome")).to_have_text("bpexp.outcome: diverged")
    expect(tag(page, "bpexp.diagnosis")).to_have_text("bpexp.diagnosis: diverged")
    expect(tag(page, "bpexp.diverged_step")).to_have_text(re.compile(r"^bpexp\.diverged_step: \d+$"))
    expect(tag(page, "bpexp.diverged_layer")).to_have_text(re.compile(r"^bpexp\.diverged_layer: \d+$"))
    stored = MlflowClient(sweep.uri).get_run(sweep.diverged).data.metrics
    expect(page.get_by_text(f"Metrics ({len(stored)})", exact=True)).to_be_visible()  # none dropped
    body = page.locator("body").inner_text()
    for word in ("NaN", "Infinity", "e+308"):
        assert word not in body
    page.screenshot(path=screenshots / "diverged_overview.png")

    page.get_by_role("tab", name="Model metrics").click()
    expect(section(page, "grad_norm")).to_have_count(1)
    page.get_by_placeholder("Search metric charts").fill("loss")
    expect(charts(page).locator("h4")).to_have_text(["loss", "loss"])  # train/loss, val/loss
    expect_drawn(page, 2)  # each with its finite values
    page.screenshot(path=screenshots / "diverged_metrics.png")


def test_the_artifacts_tab_lists_config_dynamics_and_figures(page, sweep, screenshots):
    page.goto(f"/#/experiments/{sweep.experiment_id}/runs/{sweep.completed}/artifacts?{MLFLOW_3_17_TRAINING}")
    for name in ("config.yaml", "dynamics.parquet", "plots"):
        expect(artifact(page, name)).to_be_visible()

    artifact(page, "config.yaml").click()
    expect(page.get_by_text(f"depth: {DEPTH}")).to_be_visible()  # the resolved config, as text

    artifact(page, "plots").click()
    artifact(page, "gradient_profile.png").click()
    image = page.locator('img[alt="plots/gradient_profile.png"]')
    expect(image).to_be_visible()
    assert image.evaluate("img => img.complete && img.naturalWidth") > 0  # the PNG decoded
    page.screenshot(path=screenshots / "artifacts.png")


# --------------------------------------------------------------------------------------------------
# Helpers


def run_link(page, run_id: str):
    """The link to a run in the runs table: a row shown for that run."""
    return page.locator(f'a[href$="/runs/{run_id}"]')


def section(page, group: str):
    """The header of a chart group (the metric keys' prefix before '/') on a run's Model metrics tab."""
    headers = page.get_by_test_id("experiment-view-compare-runs-section-header")
    return headers.filter(has_text=re.compile(rf"^{re.escape(group)}\s*\("))


def charts(page):
    """The chart cards of a run's Model metrics tab, in the order shown."""
    return page.get_by_test_id("experiment-view-compare-runs-card")


def expect_drawn(page, n: int) -> None:
    """n chart cards, each with its plot drawn (Plotly's root element), none still a spinner."""
    expect(charts(page)).to_have_count(n)
    expect(charts(page).locator(".js-plotly-plot")).to_have_count(n)


def expand_children(page, parent: str) -> None:
    """Click the + button of the parent's row (icon-only; the row's other control is a checkbox)."""
    row = page.get_by_role("row").filter(has=run_link(page, parent))
    row.get_by_role("button").first.click()


def tag(page, key: str):
    """A run's tag as the run page shows it: 'key: value'."""
    return page.get_by_role("status").and_(page.locator(f'[title="{key}"]'))


def artifact(page, name: str):
    return page.get_by_test_id("artifact-tree-node").and_(page.locator(f'[artifact-name="{name}"]'))


def close_assistant(page) -> None:
    """The MLflow Assistant panel opens on a first visit and takes a third of the width."""
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.count():
        close.click()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, process: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    """Poll GET /health until it answers 200, the server exits, or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)  # a port that does not answer yet: nothing to wait on but time
    pytest.fail(f"mlflow server at {base}: no 200 on /health in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def find_chromium() -> str:
    candidates = [os.environ.get("BPEXP_CHROMIUM", "")] + [
        shutil.which(name) or "" for name in ("chromium", "chromium-browser", "google-chrome")
    ]
    for path in candidates:
        if path and Path(path).is_file():
            return path
    unavailable("no Chromium found (apt-get install chromium, or set BPEXP_CHROMIUM)")


def unavailable(reason: str) -> NoReturn:
    """Skip on a workstation without a browser; fail in CI, where the browser tests must run."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)
