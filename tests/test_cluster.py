"""Sweeps on a real SLURM cluster into a real PostgreSQL-backed bpexp-server, and their faults.

scripts/cluster.py starts, once for this module, munged, slurmctld and slurmd (one node, a `cpu`
partition), PostgreSQL with a fresh database and bpexp-server on it; the sweeps are the user's command,
`python -m bpexp.train -m hydra/launcher=slurm … tracking.uri=http://127.0.0.1:PORT`, submitted through
submitit's sbatch. What is checked is what the server's store and the database hold afterwards.

Needs Debian's slurm-wlm, munge and postgresql, the psycopg driver, and root (.ci/run installs them).
Without them the tests skip, except under CI=… where they fail.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from bpexp.names import Tag
from bpexp.store import load_runs
from scripts.cluster import Cluster, missing
from tests.conftest import cli, cli_env

pytestmark = pytest.mark.slow

TINY = ["model.depth=2", "model.width=8", "probes.every=5", "hydra.launcher.state_poll_s=2"]
SLURM_JOB = re.compile(r"^\d+(_\d+)?$")


def unavailable(reason: str) -> NoReturn:
    """Skip where the cluster's packages are absent; fail in CI, where these tests must run."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    lacking = missing()
    if lacking:
        unavailable(f"no SLURM/PostgreSQL cluster here: missing {', '.join(lacking)}")
    cluster = Cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop(remove=True)


def sweep(cluster: Cluster, folder: Path, *args: str, launcher: str = "slurm") -> subprocess.Popen:
    """The user's command: a SLURM sweep of tiny nets into the cluster's tracking server."""
    command = cli(
        "-m",
        f"hydra/launcher={launcher}",
        f"tracking.uri={cluster.tracking_uri}",
        f"hydra.sweep.dir={folder}/multirun",
        *TINY,
        *args,
    )
    return subprocess.Popen(
        command,
        cwd=folder,
        env=cluster.env(cli_env()),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def children(cluster: Cluster, experiment: str) -> list:
    client = MlflowClient(cluster.tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    return [run for run in runs if Tag.parent in run.data.tags]


def wait_running(cluster: Cluster, experiment: str, job: str, metrics: bool = False, timeout: float = 120):
    """The child run of job number `job` once it is RUNNING (and has metrics in the store, if asked)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in children(cluster, experiment):
            running = run.data.tags.get(Tag.job) == job and run.info.status == "RUNNING"
            if running and (run.data.metrics or not metrics):
                return run
        time.sleep(0.5)  # polling another process's store: nothing to wait on
    pytest.fail(f"job {job} of {experiment} never ran")


def values_in_database(cluster: Cluster, run_id: str) -> int:
    """Metric values PostgreSQL holds for the run: counted in the database itself."""
    import psycopg

    with psycopg.connect(f"postgresql://bpexp@127.0.0.1:{cluster.pg_port}/bpexp") as db:
        return db.execute("select count(*) from metrics where run_uuid = %s", (run_id,)).fetchone()[0]


def values_recorded(run) -> int:
    """Every probe value the job kept on its own disk (dynamics.parquet): what the store must hold."""
    return len(pd.read_parquet(Path(run.data.tags[Tag.job_dir]) / "dynamics.parquet"))


@pytest.fixture(scope="module")
def time_limited(cluster, tmp_path_factory) -> Iterator[tuple[subprocess.Popen, str]]:
    """A job far longer than its 2-minute time limit, submitted first: it runs while the other tests do.

    SLURM may send the warning up to a minute before it is due: with a 1-minute limit it could come while
    the job is still unpickling (before any handler is set, so SIGUSR2 ends it FAILED without a run). With
    2 minutes and signal_delay_s=1, it comes 1 to 2 minutes in, when the run has long started."""
    folder = tmp_path_factory.mktemp("timeout")
    process = sweep(
        cluster,
        folder,
        "seed=0",
        "train.steps=100000000",
        "probes.every=50",
        "hydra.launcher.timeout_min=2",
        "hydra.launcher.signal_delay_s=1",
        "tracking.experiment=timeout",
        "tracking.timeout=120",  # it also lives through the server's restart in the first test
    )
    yield process, "timeout"
    if process.poll() is None:
        process.kill()


def test_sweep_through_slurm_into_postgresql_survives_a_server_restart(cluster, time_limited, tmp_path):
    """The user's sweep, and bpexp-server restarted while every job records: the jobs retry (within
    tracking.timeout), all four finish, and the database holds every value each job kept on disk."""
    args = ["seed=0,1,2,3", "train.steps=1500", "tracking.experiment=seeds", "tracking.timeout=120"]
    launcher = sweep(cluster, tmp_path, *args)
    for job in "0123":
        wait_running(cluster, "seeds", job, metrics=True)
    cluster.stop_server()
    cluster.start_server()  # the same port, the same database: 8-10 s without a server
    code, _, err = finish(launcher)
    assert code == 0, err[-3000:]

    runs = load_runs("seeds", tracking_uri=cluster.tracking_uri, include_parents=True)
    assert len(runs) == 5 and (runs["status"] == "FINISHED").all(), runs[["run_name", "status"]]
    parent = runs[runs["parent_run_id"].isna()]
    assert len(parent) == 1
    jobs = runs[runs["parent_run_id"].notna()]
    assert set(jobs["parent_run_id"]) == {parent["run_id"].iloc[0]}
    assert sorted(jobs["seed"]) == [0, 1, 2, 3]
    assert set(jobs["outcome"]) == {"completed"}
    slurm_jobs = [run.data.tags[Tag.slurm_job] for run in children(cluster, "seeds")]
    assert len(set(slurm_jobs)) == 4 and all(SLURM_JOB.match(job) for job in slurm_jobs), slurm_jobs
    for run in children(cluster, "seeds"):  # every value reached PostgreSQL, none twice
        assert values_in_database(cluster, run.info.run_id) == values_recorded(run) > 0

    report = [*cli()[:2], "bpexp.report", "--experiment", "seeds", "--tracking-uri", cluster.tracking_uri]
    report += ["--out-dir", str(tmp_path / "reports")]
    shown = subprocess.run(report, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert list((tmp_path / "reports").rglob("report.md")), shown.stdout[-2000:]


def test_scancel_kills_one_run_the_others_finish_and_resume_reruns_it(cluster, time_limited, tmp_path):
    args = ["seed=0,1,2", "train.steps=5000", "tracking.experiment=scancel"]  # scancel lands in training
    launcher = sweep(cluster, tmp_path, *args)
    victim = wait_running(cluster, "scancel", "2")
    job = victim.data.tags[Tag.slurm_job]
    subprocess.run(["scancel", job], env=cluster.env(), check=True, timeout=30)
    code, _, err = finish(launcher)
    assert code == 1, err[-3000:]
    assert "1 of 3 jobs failed" in err, err[-3000:]
    assert re.search(rf"job #2 .*seed=2.*: SLURM job {job} ended CANCELLED", err), err[-3000:]
    assert re.search(rf"#2 .*seed=2.*: killed \(SLURM job {job}: SIGTERM", err), err[-3000:]
    runs = {run.data.tags[Tag.job]: run for run in children(cluster, "scancel")}
    assert runs["2"].info.status == "KILLED" and runs["2"].data.tags[Tag.outcome] == "killed"
    assert [runs[j].info.status for j in "01"] == ["FINISHED"] * 2

    code, out, err = finish(sweep(cluster, tmp_path, *args, "sweep.resume=true"))
    assert code == 0, err[-3000:]
    assert "1 completed" in out and "2 skipped" in out, out[-2000:]
    again = [run for run in children(cluster, "scancel") if run.data.tags[Tag.job] == "2"]
    assert sorted(run.info.status for run in again) == ["FINISHED", "KILLED"]
    assert len(children(cluster, "scancel")) == 4  # jobs 0 and 1 ran once


@pytest.fixture(scope="module")
def cancelled_population(cluster, tmp_path_factory) -> Iterator[tuple[subprocess.Popen, Future]]:
    """Two populations (train.steps differs); the long one's SLURM job is scancelled as soon as its
    members' runs exist (the future gives its id), while the next test's sweep runs."""
    args = ["seed=0,1", "train.steps=100,100000000", "tracking.experiment=populations_scancel"]
    process = sweep(cluster, tmp_path_factory.mktemp("populations"), *args, launcher="batched_slurm")

    def cancel() -> str:
        victim = wait_running(cluster, "populations_scancel", "3")  # jobs 1 and 3, 3's run made last
        job = victim.data.tags[Tag.slurm_job]
        subprocess.run(["scancel", job], env=cluster.env(), check=True, timeout=30)
        return job

    with ThreadPoolExecutor(1) as pool:
        yield process, pool.submit(cancel)
        if process.poll() is None:
            process.kill()


def test_populations_through_slurm_one_job_each(cluster, cancelled_population, tmp_path):
    """hydra/launcher=batched_slurm: 4 seeds, at most 2 members a population, so 2 SLURM jobs; each
    member's run is its lone run's (params, metrics, artifacts), tagged with its population and with
    that population's SLURM job."""
    args = ["seed=0,1,2,3", "train.steps=200", "tracking.experiment=populations"]
    launcher = sweep(cluster, tmp_path, *args, "hydra.launcher.max_members=2", launcher="batched_slurm")
    code, _, err = finish(launcher)
    assert code == 0, err[-3000:]

    runs = children(cluster, "populations")
    assert len(runs) == 4 and {run.info.status for run in runs} == {"FINISHED"}, err[-3000:]
    assert len({run.data.tags[Tag.parent] for run in runs}) == 1
    assert sorted(int(run.data.params["seed"]) for run in runs) == [0, 1, 2, 3]
    jobs: dict[str, set[str]] = {}  # population -> the SLURM jobs its members were tagged with
    for run in runs:
        tags = run.data.tags
        jobs.setdefault(tags[Tag.population], set()).add(tags[Tag.slurm_job])
        assert tags[Tag.outcome] == "completed" and tags[Tag.population_size] == "2"
        assert SLURM_JOB.match(tags[Tag.slurm_job]), tags[Tag.slurm_job]
        assert values_in_database(cluster, run.info.run_id) == values_recorded(run) > 0
        artifacts = {a.path for a in MlflowClient(cluster.tracking_uri).list_artifacts(run.info.run_id)}
        assert {"config.yaml", "dynamics.parquet"} <= artifacts, artifacts
    assert len(jobs) == 2 and all(len(one) == 1 for one in jobs.values()), jobs
    assert len(set.union(*jobs.values())) == 2, jobs  # one SLURM job per population, not one per run


def test_scancel_of_a_population_kills_its_members_the_other_finishes(cluster, cancelled_population):
    """scancel of the long population's SLURM job ends both its members KILLED with the reason; the
    other population finishes, and the sweep names the cancelled one and exits 1."""
    process, cancelled = cancelled_population
    job = cancelled.result(timeout=180)
    code, _, err = finish(process)
    assert code == 1, err[-3000:]
    assert re.search(rf"population of jobs #1, #3: SLURM job {job} ended CANCELLED", err), err[-3000:]
    assert "2 of 4 jobs failed" in err, err[-3000:]
    runs = {run.data.tags[Tag.job]: run for run in children(cluster, "populations_scancel")}
    assert [runs[j].info.status for j in "0123"] == ["FINISHED", "KILLED"] * 2
    for j in "13":
        assert runs[j].data.tags[Tag.slurm_job] == job
        assert runs[j].data.tags[Tag.killed_by].startswith(f"SLURM job {job}"), runs[j].data.tags


def test_concurrent_writers_into_postgresql_lose_nothing(cluster, time_limited):
    from scripts.bench_store_concurrency import BATCHES, PROCESSES, VALUES, hammer

    numbers = hammer(cluster.tracking_uri)
    assert numbers["errors"] == []
    assert numbers["counted"] == numbers["sent"] == PROCESSES * BATCHES * VALUES
    assert numbers["finished"] == PROCESSES


def test_job_past_its_time_limit_ends_killed_with_the_reason(cluster, time_limited):
    """Last: the job submitted first, with timeout_min=2, has had its time by now."""
    process, experiment = time_limited
    code, _, err = finish(process, timeout=180)
    assert code == 1, err[-3000:]
    runs = children(cluster, experiment)
    assert len(runs) == 1, err[-3000:]
    run = runs[0]
    assert run.info.status == "KILLED" and run.data.tags[Tag.outcome] == "killed", (
        run.data.tags,
        err[-3000:],
    )
    job = run.data.tags[Tag.slurm_job]
    # SIGUSR2 before the limit (inside the run), or SIGTERM at it: the run ends KILLED either way
    reason = run.data.tags[Tag.killed_by]
    assert re.match(rf"SLURM job {job}(: time limit near| TIMEOUT)", reason), reason
    assert f"SLURM job {job.split('_')[0]}" in err and "without a result" in err, err[-3000:]
