"""From the tracking store to pandas: runs, sweeps and their dynamics (MLflow and Parquet).

The loaders under analysis.py, which only computes: ``load_runs`` (one row per run),
``load_dynamics`` (the long table run_id, step, layer, quantity, value) and ``find_sweep`` (turn
"latest", a sweep id or a parent run id into a sweep). Imports no training code (docs/design.md): its
inputs are the tracking store (embedded SQLite or a server) and the runs' ``dynamics.parquet`` artifacts.
Over 400 lines because MLflow's paging, param typing, and the fast Parquet path (preallocated columns,
dictionary codes) each need their own few functions; they share nothing with the statistics.

Column names: params keep their dotted config keys (``model.depth``), metrics their MLflow keys
(``val/loss``), bpexp tags lose their prefix (``outcome``, ``diagnosis``, ``sweep``).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import socket
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bpexp.console import outcomes_text
from bpexp.lifecycle import process_alive
from bpexp.names import RUN_COLUMNS, SWEEP_ROLE, Outcome, Tag, split_key
from bpexp.progress import Progress

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

DYNAMICS_FILE = "dynamics.parquet"
DYNAMICS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("layer", pa.int64()),
        ("quantity", pa.dictionary(pa.int32(), pa.string())),  # read as codes: no string per row
        ("value", pa.float64()),
    ]
)
INT_TAGS = {"diverged_step", "diverged_layer", "job"}
SEARCH_PAGE = 1000

# --------------------------------------------------------------------------------------------------
# The store


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the embedded SQLite store of the current directory (as train does)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve()}/mlflow.db"


def make_client(tracking_uri: str | None = None) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())


def experiment_id(client: MlflowClient, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise LookupError(
            f"experiment={experiment!r} is not in the store at {client.tracking_uri}; "
            f"experiments there: {', '.join(names) or 'none'}"
        )
    return found.experiment_id


def search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str = "") -> list[Any]:
    """Every matching run, page by page, oldest first."""
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string,
            max_results=SEARCH_PAGE,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def close_abandoned_sweeps(client: MlflowClient, experiment_ids: list[str]) -> list[str]:
    """End KILLED each RUNNING sweep whose launching process, on this host, is gone (kill -9, OOM): its
    workers stopped their runs when they saw it die (bpexp/sweep.py), but no one closed the parent. Its
    children still RUNNING end KILLED too. Returns the parent run ids it closed."""
    host = socket.gethostname()
    query = f"tags.`{Tag.role}` = '{SWEEP_ROLE}' and attributes.status = 'RUNNING'"
    closed = []
    for parent in search_all(client, experiment_ids, query):
        tags = parent.data.tags
        pid, launched = as_int(tags.get(Tag.launcher_pid)), as_int(tags.get(Tag.launched_at))
        if tags.get(Tag.launcher_host) != host or pid is None or process_alive(pid, launched):
            continue  # another host's launcher (no way to tell from here), or a live one
        why = f"launcher process {pid} on {host} ended without closing the sweep (SIGKILL, OOM or crash)"
        children = search_all(
            client, [parent.info.experiment_id], f"tags.`{Tag.parent}` = {quote(parent.info.run_id)}"
        )
        for run in children:
            if run.info.status == "RUNNING":
                client.set_tag(run.info.run_id, Tag.outcome, Outcome.killed)
                client.set_tag(run.info.run_id, Tag.killed_by, why)
                client.set_terminated(run.info.run_id, "KILLED")
                run.data.tags[Tag.outcome] = Outcome.killed
        counts = Counter(run.data.tags.get(Tag.outcome, Outcome.failed) for run in latest_runs(children))
        for tag, value in {
            Tag.outcome: Outcome.killed,
            Tag.killed_by: why,
            Tag.summary: outcomes_text(counts),
        }.items():
            client.set_tag(parent.info.run_id, tag, value)
        client.set_terminated(parent.info.run_id, "KILLED")
        closed.append(parent.info.run_id)
    return closed


def quote(value: str) -> str:
    """A value inside a single-quoted MLflow filter string."""
    return "'" + value.replace("'", "\\'") + "'"


# --------------------------------------------------------------------------------------------------
# Params: MLflow strings back to values


NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE)
PYTHON_WORDS = {"None": None, "True": True, "False": False}  # str() of a value logged by other code


def parse_param(text: str | None) -> Any:
    """One MLflow param string back to its value: `null` -> None, `true` -> True, `3` -> 3, `1e-05` ->
    1e-05, `inf` -> inf, `[0.9, 0.999]` -> (0.9, 0.999) (a tuple, so it can be a group key), anything
    else -> the string itself.

    JSON first, then Python's float for what JSON lacks (`inf`, `nan`, `.5`): YAML 1.1 would read
    `1e-05` as a string and `no` as False.
    """
    if text is None:
        return None
    if text in PYTHON_WORDS:
        return PYTHON_WORDS[text]
    try:
        value = json.loads(text)
    except ValueError:
        return float(text) if NUMBER.fullmatch(text.strip()) else text
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict):
        return text  # no config value is a mapping; keep the string rather than an unhashable dict
    return value


def typed_column(values: Sequence[Any]) -> pd.Series:
    """A column of parsed values with the narrowest dtype: boolean, Int64, float64, else object/str.

    Missing (None) becomes <NA> or NaN; a column mixing kinds (numbers and strings) keeps its values.
    """
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pd.Series(pd.array(values, dtype="boolean"))
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pd.Series(pd.array(values, dtype="Int64"))
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pd.Series([math.nan if v is None else float(v) for v in values], dtype="float64")
    if present and all(isinstance(v, str) for v in present):
        return pd.Series(values)
    return pd.Series(values, dtype=object)


def typed_params(raw: pd.DataFrame) -> pd.DataFrame:
    """MLflow's param strings (missing = None) -> typed columns, each column as narrow as it goes."""
    columns = {
        name: typed_column([parse_param(v) for v in raw[name]]).set_axis(raw.index) for name in raw.columns
    }
    return pd.DataFrame(columns, index=raw.index)


# --------------------------------------------------------------------------------------------------
# Runs


def load_runs(
    experiment: str = "bpexp",
    sweep: str | None = None,
    tracking_uri: str | None = None,
    *,
    parent_run_id: str | None = None,
    layer_metrics: bool = False,
    include_parents: bool = False,
    latest_per_job: bool = True,
    filter_string: str = "",
) -> pd.DataFrame:
    """One row per run of `experiment` (of one sweep when `sweep` or `parent_run_id` is given).

    Columns: RUN_COLUMNS (run info; the bpexp.* tags without their prefix, `diverged_step` as Int64;
    `parent_run_id` from mlflow.parentRunId), then every param under its dotted key, typed back with
    ``parse_param`` (theory.chi1 … where logged), then the final value of every network-level metric
    (`val/loss`, `delta/log10_ratio`, `theory/delta_log10_ratio` …; per-layer ones too with
    `layer_metrics=True`). With both `sweep` and `parent_run_id`, a run that has either link counts.
    A sweep's parent run (tagged bpexp.role=sweep, or named as parent by a loaded run) is left out
    unless `include_parents`. A resumed sweep launches a job again (tag bpexp.job): only its latest
    run is kept unless `latest_per_job=False`. ``frame.attrs`` keeps tracking_uri, experiment and the
    param column names.
    """
    client = make_client(tracking_uri)
    exp_id = experiment_id(client, experiment)
    clauses = [filter_string] if filter_string else []
    searches = []
    if sweep is not None:
        searches.append([*clauses, f"tags.`{Tag.sweep}` = {quote(sweep)}"])
    if parent_run_id is not None:
        searches.append([*clauses, f"tags.`{Tag.parent}` = {quote(parent_run_id)}"])
    found: dict[str, Any] = {}
    for search in searches or [clauses]:
        for run in search_all(client, [exp_id], " and ".join(search)):
            found.setdefault(run.info.run_id, run)
    runs = sorted(found.values(), key=lambda r: (r.info.start_time or 0, r.info.run_id))
    if not include_parents:
        parents = {r.data.tags.get(Tag.parent) for r in runs} | {parent_run_id}
        runs = [r for r in runs if r.info.run_id not in parents and r.data.tags.get(Tag.role) != SWEEP_ROLE]
    if latest_per_job:
        runs = latest_runs(runs)
    frame = runs_frame(runs, layer_metrics)
    frame.attrs.update(
        tracking_uri=client.tracking_uri,
        experiment=experiment,
        params=[c for c in frame.columns if c in param_names(runs)],
    )
    return frame


def latest_runs(runs: list[Any]) -> list[Any]:
    """The last-started run of each (sweep, job); runs without a bpexp.job tag all stay (in order)."""
    latest: dict[Any, Any] = {}
    for run in runs:  # sorted by start time: a later launch of the same job replaces the earlier one
        tags = run.data.tags
        job = tags.get(Tag.job)
        key = (tags.get(Tag.sweep), tags.get(Tag.parent), job) if job is not None else run.info.run_id
        latest[key] = run
    keep = {run.info.run_id for run in latest.values()}
    return [run for run in runs if run.info.run_id in keep]


def param_names(runs: list[Any]) -> set[str]:
    return {key for run in runs for key in run.data.params}


def runs_frame(runs: list[Any], layer_metrics: bool = False) -> pd.DataFrame:
    """MLflow Run objects -> the load_runs table (kept separate so it is testable without a store)."""
    info_rows, param_rows, metric_rows = [], [], []
    for run in runs:
        tags, info = run.data.tags, run.info
        row: dict[str, Any] = {
            "run_id": info.run_id,
            "run_name": info.run_name or tags.get("mlflow.runName"),
            "status": info.status,
            "parent_run_id": tags.get(Tag.parent),
            "start_time": pd.to_datetime(info.start_time, unit="ms", utc=True) if info.start_time else pd.NaT,
            "duration_s": (info.end_time - info.start_time) / 1000
            if info.end_time and info.start_time
            else math.nan,
            "experiment_id": info.experiment_id,
            "artifact_uri": info.artifact_uri,
        }
        for key, value in tags.items():
            if key.startswith("bpexp."):
                row[key.removeprefix("bpexp.")] = value
        info_rows.append(row)
        param_rows.append(dict(run.data.params))
        metric_rows.append(
            {k: v for k, v in run.data.metrics.items() if layer_metrics or split_key(k)[1] is None}
        )
    info = pd.DataFrame(
        info_rows, columns=list(dict.fromkeys([*RUN_COLUMNS, *(k for r in info_rows for k in r)]))
    )
    for name in INT_TAGS & set(info.columns):
        info[name] = pd.array([as_int(v) for v in info[name]], dtype="Int64")
    raw_params = pd.DataFrame(param_rows, dtype=object).reindex(
        columns=sorted({k for r in param_rows for k in r})
    )
    params = typed_params(raw_params.where(raw_params.notna(), None))
    metrics = pd.DataFrame(metric_rows, dtype="float64")
    metrics = metrics.reindex(columns=sorted(metrics.columns))
    return pd.concat([info, params, metrics], axis=1)


def as_int(text: Any) -> int | None:
    """A tag that holds an integer, or None (missing, 'None', anything else)."""
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# Sweeps


@dataclass(frozen=True)
class Sweep:
    """One multirun in the store: its id (the bpexp.sweep tag) and its parent run, if there is one."""

    sweep_id: str
    parent_run_id: str | None
    experiment: str
    tracking_uri: str

    def runs(self, **kwargs: Any) -> pd.DataFrame:
        """load_runs for this sweep's child runs."""
        return load_runs(
            self.experiment,
            sweep=self.sweep_id,
            tracking_uri=self.tracking_uri,
            parent_run_id=self.parent_run_id,
            **kwargs,
        )


def find_sweep(ref: str = "latest", experiment: str = "bpexp", tracking_uri: str | None = None) -> Sweep:
    """A sweep by its id (the bpexp.sweep tag), by its parent run id (or a child's), or 'latest': the
    sweep of the most recently started run with a bpexp.sweep tag."""
    client = make_client(tracking_uri)
    exp_id = experiment_id(client, experiment)
    uri = client.tracking_uri
    close_abandoned_sweeps(client, [exp_id])
    if ref == "latest":
        page = client.search_runs(
            [exp_id], f"tags.`{Tag.sweep}` != ''", max_results=1, order_by=["attributes.start_time DESC"]
        )
        if not page:
            raise LookupError(f"no run in experiment={experiment!r} at {uri} has a bpexp.sweep tag")
        sweep_id = page[0].data.tags[Tag.sweep]
        return Sweep(sweep_id, sweep_parent(client, exp_id, sweep_id), experiment, uri)
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(ref)
        except MlflowException:
            run = None
        if run is not None:
            tags = run.data.tags
            parent = tags.get(Tag.parent) if tags.get(Tag.role) != SWEEP_ROLE else None
            parent = parent or ref  # a child's run id stands for its sweep
            return Sweep(tags.get(Tag.sweep, parent), parent, experiment, uri)
    if client.search_runs([exp_id], f"tags.`{Tag.sweep}` = {quote(ref)}", max_results=1):
        return Sweep(ref, sweep_parent(client, exp_id, ref), experiment, uri)
    known = {r.data.tags[Tag.sweep] for r in client.search_runs([exp_id], f"tags.`{Tag.sweep}` != ''")}
    raise LookupError(
        f"sweep {ref!r} is not in experiment={experiment!r} at {uri}; give a sweep id, a parent run id or "
        f"'latest' (sweeps there: {', '.join(sorted(known)[:10]) or 'none'})"
    )


def sweep_parent(client: MlflowClient, exp_id: str, sweep_id: str) -> str | None:
    """The sweep's run tagged bpexp.role=sweep, else the run its children name as parent, else its one
    tagged run without a parent."""
    runs = search_all(client, [exp_id], f"tags.`{Tag.sweep}` = {quote(sweep_id)}")
    for run in runs:
        if run.data.tags.get(Tag.role) == SWEEP_ROLE:
            return run.info.run_id
    ids = {r.info.run_id for r in runs}
    named = [r.data.tags.get(Tag.parent) for r in runs]
    for parent in named:
        if parent in ids:
            return parent
    roots = [r.info.run_id for r in runs if Tag.parent not in r.data.tags]
    return roots[0] if len(roots) == 1 and len(runs) > 1 else next((p for p in named if p), None)


# --------------------------------------------------------------------------------------------------
# Dynamics


def local_artifact_dir(artifact_uri: str | None) -> Path | None:
    """The folder behind a file:// (or plain path) artifact URI; None for a remote store."""
    if not artifact_uri:
        return None
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or re.fullmatch(r"[a-zA-Z]", parsed.scheme):  # a path (C:\ on Windows)
        return Path(artifact_uri)
    return None


def load_dynamics(
    runs: pd.DataFrame | Iterable[str],
    tracking_uri: str | None = None,
    quantities: Iterable[str] | None = None,
    *,
    source: str = "auto",
    workers: int = 8,
    progress: bool = False,
) -> pd.DataFrame:
    """The long table run_id, step, layer, quantity, value of many runs (`progress`: a bar on stderr).

    `runs`: a load_runs frame (its artifact_uri and attrs['tracking_uri'] are used) or run ids.
    `source`: 'auto' reads each run's dynamics.parquet and falls back to the MLflow metric history
    for a run without one; 'parquet' or 'history' force one path. `quantities` (e.g. ['grad_norm',
    'val/loss']) keeps only those. Dtypes: run_id and quantity categorical, step int64, layer Int64
    (<NA> for network-level quantities), value float64. Parquet artifacts are read in place when the
    artifact store is a local folder, else downloaded, `workers` at a time; the metric history holds
    only finite values (the tracker skips NaN/inf), the Parquet file every value.
    ``frame.attrs['sources']`` says how many runs came from each path.
    """
    if source not in ("auto", "parquet", "history"):
        raise ValueError(f"source={source!r} is not one of: auto, parquet, history")
    if isinstance(runs, pd.DataFrame):
        run_ids = [str(r) for r in runs["run_id"]]
        uris = list(runs["artifact_uri"]) if "artifact_uri" in runs else [None] * len(run_ids)
        tracking_uri = tracking_uri or runs.attrs.get("tracking_uri")
    else:
        run_ids, uris = [str(r) for r in runs], None
    wanted = None if quantities is None else sorted(set(quantities))
    client = make_client(tracking_uri)  # connects on first use only: not at all for local Parquet files
    if uris is None:
        with ThreadPoolExecutor(workers) as pool:
            uris = list(pool.map(lambda r: client.get_run(r).info.artifact_uri, run_ids))
    tables: dict[str, pa.Table] = {}
    missing = list(run_ids)
    if source != "history":
        with (
            tempfile.TemporaryDirectory(prefix="bpexp-dynamics-") as tmp,
            ThreadPoolExecutor(workers) as pool,
        ):
            read = pool.map(
                lambda item: read_parquet_artifact(client, item[0], item[1], wanted, Path(tmp)),
                zip(run_ids, uris, strict=True),
            )
            bar = Progress(len(run_ids), "dynamics", stream=None if progress else io.StringIO(), unit="run")
            for done, (r, t) in enumerate(zip(run_ids, read, strict=True), start=1):
                if t is not None:
                    tables[r] = t
                bar.update(done)
            bar.close()
        missing = [r for r in run_ids if r not in tables]
        if source == "parquet" and missing:
            raise FileNotFoundError(f"no {DYNAMICS_FILE} artifact for runs: {', '.join(missing[:5])}")
    if missing:
        tables.update(history_tables(client, missing, wanted, workers))
    frame = combine(run_ids, tables)
    if wanted is not None:  # a Parquet dictionary lists every quantity of the file, not only those read
        frame["quantity"] = frame["quantity"].cat.remove_unused_categories()
    frame.attrs["sources"] = {"parquet": len(run_ids) - len(missing), "history": len(missing)}
    return frame


def read_parquet_artifact(
    client: MlflowClient, run_id: str, artifact_uri: str | None, quantities: list[str] | None, tmp: Path
) -> pa.Table | None:
    """One run's dynamics.parquet as an Arrow table in DYNAMICS_SCHEMA; None when the run has none."""
    folder = local_artifact_dir(artifact_uri)
    if folder is not None:
        path = folder / DYNAMICS_FILE
        if not path.is_file():
            return None
    else:
        from mlflow.exceptions import MlflowException

        try:
            path = Path(client.download_artifacts(run_id, DYNAMICS_FILE, str(tmp / run_id)))
        except (MlflowException, OSError):
            return None
    filters = [("quantity", "in", quantities)] if quantities is not None else None
    # One thread per file: the files are small and the pool already runs `workers` of them at once.
    table = pq.read_table(
        path, columns=DYNAMICS_SCHEMA.names, filters=filters, use_threads=False, read_dictionary=["quantity"]
    )
    return table.cast(DYNAMICS_SCHEMA)


def history_tables(
    client: MlflowClient, run_ids: list[str], quantities: list[str] | None, workers: int
) -> dict[str, pa.Table]:
    """The dynamics of runs without a Parquet artifact, from MLflow's metric history: one request per
    (run, metric key), `workers` at a time. Slow for many layers (see scripts/bench_dynamics.py)."""
    with ThreadPoolExecutor(workers) as pool:
        keys = list(pool.map(lambda r: list(client.get_run(r).data.metrics), run_ids))
        jobs = [
            (run_id, key)
            for run_id, run_keys in zip(run_ids, keys, strict=True)
            for key in sorted(run_keys)
            if quantities is None or split_key(key)[0] in quantities
        ]
        histories = list(pool.map(lambda job: client.get_metric_history(*job), jobs))
    columns: dict[str, dict[str, list[Any]]] = {
        r: {"step": [], "layer": [], "quantity": [], "value": []} for r in run_ids
    }
    for (run_id, key), history in zip(jobs, histories, strict=True):
        quantity, layer = split_key(key)
        out = columns[run_id]
        out["step"].extend(m.step for m in history)
        out["value"].extend(m.value for m in history)
        out["layer"].extend([layer] * len(history))
        out["quantity"].extend([quantity] * len(history))
    plain = pa.schema([f.with_type(pa.string()) if f.name == "quantity" else f for f in DYNAMICS_SCHEMA])
    return {r: pa.table(c, schema=plain).cast(DYNAMICS_SCHEMA) for r, c in columns.items()}


def combine(run_ids: list[str], tables: dict[str, pa.Table]) -> pd.DataFrame:
    """Per-run Arrow tables -> one DataFrame, written once into preallocated columns (each first touch
    of fresh memory costs a page fault, so no intermediate copies). run_id is a categorical built from
    the tables' lengths and quantity one from the Parquet dictionary codes: no Python string per row."""
    order = [r for r in run_ids if r in tables]
    n = sum(tables[r].num_rows for r in order)
    step, layer, value = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.float64)
    missing, quantity, run = np.empty(n, bool), np.empty(n, np.int32), np.empty(n, np.int32)
    categories: dict[str, int] = {}
    offset = 0
    for code, run_id in enumerate(order):
        for batch in tables[run_id].to_batches():
            end = offset + batch.num_rows
            run[offset:end] = code
            step[offset:end] = batch.column("step").to_numpy()
            value[offset:end] = batch.column("value").to_numpy(
                zero_copy_only=False
            )  # NaN was written as null
            layers = batch.column("layer")
            layer[offset:end] = layers.fill_null(0).to_numpy()
            missing[offset:end] = layers.is_null().to_numpy(zero_copy_only=False)
            names = batch.column("quantity")
            lookup = np.array(
                [categories.setdefault(name, len(categories)) for name in names.dictionary.to_pylist()],
                dtype=np.int32,
            )
            quantity[offset:end] = lookup[names.indices.to_numpy(zero_copy_only=False)]
            offset = end
    columns = {
        "run_id": pd.Categorical.from_codes(run, categories=pd.Index(order, dtype=object)),
        "step": step,
        "layer": pd.arrays.IntegerArray(layer, missing),
        "quantity": pd.Categorical.from_codes(quantity, categories=pd.Index(list(categories), dtype=object)),
        "value": value,
    }
    return pd.DataFrame(columns, copy=False)
