"""From the tracking store to pandas: runs, dynamics, per-run summaries, aggregates over seeds.

Imports no training code (DESIGN.md): its inputs are the tracking store (embedded SQLite or a server),
the runs' ``dynamics.parquet`` artifacts, and DataFrames. Three kinds of function:

- loaders: ``load_runs`` (one row per run) and ``load_dynamics`` (the long table run_id, step, layer,
  quantity, value), plus ``find_sweep`` to turn "latest" or a parent run id into a sweep;
- per-run numbers: ``summarize`` (δ and ∂L/∂W profiles at init and at the end, losses, divergence);
- across runs: ``bootstrap_ci``, ``aggregate`` (mean and 95% CI over seeds), ``pivot``, ``rank_configs``.

Column names: params keep their dotted config keys (``model.depth``), metrics their MLflow keys
(``val/loss``), bpexp tags lose their prefix (``outcome``, ``diagnosis``, ``sweep``), and the numbers
``summarize`` derives are snake_case (``delta_log10_ratio_init``).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bpexp.progress import Progress

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

TINY = 1e-300  # floor before log10, as in the probes: an exact-zero norm stays finite
DYNAMICS_FILE = "dynamics.parquet"
DYNAMICS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("layer", pa.int64()),
        ("quantity", pa.dictionary(pa.int32(), pa.string())),  # read as codes: no string per row
        ("value", pa.float64()),
    ]
)
# Columns load_runs builds from run info and tags, in this order, before params and metrics.
RUN_COLUMNS = [
    "run_id",
    "run_name",
    "status",
    "outcome",
    "diagnosis",
    "diverged_step",
    "sweep",
    "parent_run_id",
    "start_time",
    "duration_s",
    "experiment_id",
    "artifact_uri",
]
INT_TAGS = {"diverged_step", "diverged_layer", "job"}
# Params that describe how a run was executed or predicted, not which network it trained.
NOT_CONFIG = re.compile(r"^(seed|device|theory\..*|tracking\..*|sweep\..*|train\.threads)$")
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


def split_key(key: str) -> tuple[str, int | None]:
    """'grad_norm/l007' -> ('grad_norm', 7); 'val/loss' -> ('val/loss', None) (the probes' key scheme)."""
    quantity, _, last = key.rpartition("/")
    if quantity and last[:1] == "l" and last[1:].isdigit():
        return quantity, int(last[1:])
    return key, None


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
        searches.append([*clauses, f"tags.`bpexp.sweep` = {quote(sweep)}"])
    if parent_run_id is not None:
        searches.append([*clauses, f"tags.`mlflow.parentRunId` = {quote(parent_run_id)}"])
    found: dict[str, Any] = {}
    for search in searches or [clauses]:
        for run in search_all(client, [exp_id], " and ".join(search)):
            found.setdefault(run.info.run_id, run)
    runs = sorted(found.values(), key=lambda r: (r.info.start_time or 0, r.info.run_id))
    if not include_parents:
        parents = {r.data.tags.get("mlflow.parentRunId") for r in runs} | {parent_run_id}
        runs = [r for r in runs if r.info.run_id not in parents and r.data.tags.get("bpexp.role") != "sweep"]
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
        job = tags.get("bpexp.job")
        key = (
            (tags.get("bpexp.sweep"), tags.get("mlflow.parentRunId"), job)
            if job is not None
            else run.info.run_id
        )
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
            "parent_run_id": tags.get("mlflow.parentRunId"),
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


def param_columns(frame: pd.DataFrame) -> list[str]:
    """The columns that came from params: attrs['params'] when load_runs set it, else by name (dotted
    config keys, and the top-level `seed` and `device`)."""
    known = frame.attrs.get("params")
    if known is not None:
        return [c for c in frame.columns if c in set(known)]
    derived = set(RUN_COLUMNS) | set(SUMMARY_COLUMNS)
    return [
        c
        for c in frame.columns
        if c not in derived and "/" not in c and ("." in c or c in ("seed", "device"))
    ]


def config_columns(frame: pd.DataFrame) -> list[str]:
    """Params that vary across the runs and describe the network or its training (not the seed,
    tracking, device or theory.*): the axes of a sweep, e.g. ['model.activation', 'model.depth']."""
    columns = []
    for name in param_columns(frame):
        if NOT_CONFIG.match(name):
            continue
        if frame[name].nunique(dropna=False) > 1:
            columns.append(name)
    return columns


def config_label(frame: pd.DataFrame, columns: Sequence[str] | None = None) -> pd.Series:
    """'depth=8 activation=tanh optim=adam' per row, from the label_columns of `columns` (default:
    config_columns): the last part of each dotted key (the group for `<group>.name`), unless two clash."""
    columns = label_columns(frame, config_columns(frame) if columns is None else columns)
    if not columns:
        return pd.Series("all runs", index=frame.index, dtype=object)
    short = [short_name(c) for c in columns]
    names = short if len(set(short)) == len(short) else columns
    parts = [
        frame[c].map(lambda v, n=n: f"{n}={format_value(v)}") for c, n in zip(columns, names, strict=True)
    ]
    label = parts[0].astype(object)
    for part in parts[1:]:
        label = label + " " + part.astype(object)
    return label


def short_name(column: str) -> str:
    """'model.depth' -> 'depth'; 'optim.name' -> 'optim' (the option chosen for the group)."""
    group, _, key = column.rpartition(".")
    return group.rsplit(".", 1)[-1] if key == "name" and group else key


def label_columns(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The columns a label needs: `columns` less those that another one fixes. Sweeping `optim=momentum,adam`
    varies optim.name, optim.lr and optim.momentum together; each optimizer's lr follows from its name,
    so the label says `optim=adam`, not `name=adam lr=0.001`. Group choices (`*.name`) are kept first. A
    column whose every value is its own config (a search over η) fixes nothing and stays alone."""
    configs = frame[list(columns)].drop_duplicates()
    kept: list[str] = []
    for column in sorted(columns, key=lambda c: not c.endswith(".name")):  # stable sort
        fixed_by = [
            k
            for k in kept
            if configs[k].nunique(dropna=False) < len(configs)
            and (configs.groupby(k, dropna=False)[column].nunique(dropna=False) <= 1).all()
        ]
        if not fixed_by:
            kept.append(column)
    return [c for c in columns if c in kept]


def format_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


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
    if ref == "latest":
        page = client.search_runs(
            [exp_id], "tags.`bpexp.sweep` != ''", max_results=1, order_by=["attributes.start_time DESC"]
        )
        if not page:
            raise LookupError(f"no run in experiment={experiment!r} at {uri} has a bpexp.sweep tag")
        sweep_id = page[0].data.tags["bpexp.sweep"]
        return Sweep(sweep_id, sweep_parent(client, exp_id, sweep_id), experiment, uri)
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(ref)
        except MlflowException:
            run = None
        if run is not None:
            tags = run.data.tags
            parent = tags.get("mlflow.parentRunId") if tags.get("bpexp.role") != "sweep" else None
            parent = parent or ref  # a child's run id stands for its sweep
            return Sweep(tags.get("bpexp.sweep", parent), parent, experiment, uri)
    if client.search_runs([exp_id], f"tags.`bpexp.sweep` = {quote(ref)}", max_results=1):
        return Sweep(ref, sweep_parent(client, exp_id, ref), experiment, uri)
    known = {r.data.tags["bpexp.sweep"] for r in client.search_runs([exp_id], "tags.`bpexp.sweep` != ''")}
    raise LookupError(
        f"sweep {ref!r} is not in experiment={experiment!r} at {uri}; give a sweep id, a parent run id or "
        f"'latest' (sweeps there: {', '.join(sorted(known)[:10]) or 'none'})"
    )


def sweep_parent(client: MlflowClient, exp_id: str, sweep_id: str) -> str | None:
    """The sweep's run tagged bpexp.role=sweep, else the run its children name as parent, else its one
    tagged run without a parent."""
    runs = search_all(client, [exp_id], f"tags.`bpexp.sweep` = {quote(sweep_id)}")
    for run in runs:
        if run.data.tags.get("bpexp.role") == "sweep":
            return run.info.run_id
    ids = {r.info.run_id for r in runs}
    named = [r.data.tags.get("mlflow.parentRunId") for r in runs]
    for parent in named:
        if parent in ids:
            return parent
    roots = [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags]
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


# --------------------------------------------------------------------------------------------------
# Per-run summaries


def profile(layer_norms: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(log10(‖·^(1)‖/‖·^(L)‖), least-squares slope of log10‖·^(l)‖ against l, in decades per layer),
    the norms given for l = 1 … L. Negative: the signal shrinks toward the input; 10**slope is the
    per-layer gain."""
    logs = np.log10(np.maximum(np.asarray(layer_norms, dtype=np.float64), TINY))
    if len(logs) < 2:
        return 0.0, 0.0
    slope = np.polyfit(np.arange(1, len(logs) + 1), logs, 1)[0]
    return float(logs[0] - logs[-1]), float(slope)


def profiles(dynamics: pd.DataFrame, quantity: str) -> pd.DataFrame:
    """Per (run_id, step) with a complete, finite per-layer profile of `quantity`: log10_ratio, slope.

    Vectorized over all runs (a least-squares slope is cov(l, y)/var(l)); a step where a layer is
    missing or non-finite (the step a run diverged) is left out.
    """
    rows = dynamics.loc[(dynamics["quantity"] == quantity) & dynamics["layer"].notna()]
    if rows.empty:
        return pd.DataFrame({"run_id": [], "step": [], "log10_ratio": [], "slope": []})
    run_codes, run_ids = pd.factorize(rows["run_id"].astype(object))  # int keys group fast
    value = rows["value"].to_numpy(dtype=np.float64)
    finite = np.isfinite(value)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.where(finite, np.log10(np.maximum(value, TINY)), np.nan)
    frame = pd.DataFrame(
        {"run": run_codes, "step": rows["step"].to_numpy(), "l": rows["layer"].to_numpy(dtype=np.float64)}
    ).assign(y=y, finite=finite)
    group = frame.groupby(["run", "step"], sort=True)
    frame["l_c"] = frame["l"] - group["l"].transform("mean")
    frame["ly"] = frame["l_c"] * (frame["y"] - group["y"].transform("mean"))
    frame["ll"] = frame["l_c"] ** 2
    ends = frame.sort_values("l", kind="stable").groupby(["run", "step"], sort=True)["y"]
    stats = frame.groupby(["run", "step"], sort=True).agg(
        n=("l", "size"), finite=("finite", "all"), ly=("ly", "sum"), ll=("ll", "sum")
    )
    layers = frame.groupby("run")["l"].nunique()
    complete = stats["finite"] & (
        stats["n"].to_numpy() == layers.loc[stats.index.get_level_values(0)].to_numpy()
    )
    out = pd.DataFrame(
        {
            "log10_ratio": ends.first() - ends.last(),  # l = 1 (input side) minus l = L (output)
            "slope": (stats["ly"] / stats["ll"]).where(stats["ll"] > 0, 0.0),
        }
    )[complete].reset_index()
    run_id = pd.Series(np.asarray(run_ids, dtype=object)[out["run"].to_numpy()], index=out.index)
    return out.drop(columns="run").assign(run_id=run_id)[["run_id", "step", "log10_ratio", "slope"]]


SUMMARY_COLUMNS = [
    "init_step",
    "end_step",
    "delta_log10_ratio_init",
    "delta_log10_ratio_end",
    "delta_slope_init",
    "delta_slope_end",
    "delta_gain_init",
    "delta_gain_end",
    "grad_log10_ratio_init",
    "grad_log10_ratio_end",
    "grad_slope_init",
    "grad_slope_end",
    "grad_gain_init",
    "grad_gain_end",
    "diverged",
    "final_val_loss",
    "best_val_loss",
    "best_val_step",
]


def summarize(runs: pd.DataFrame, dynamics: pd.DataFrame) -> pd.DataFrame:
    """The runs table plus, per run, the numbers a sweep is compared on (SUMMARY_COLUMNS):

    - `delta_*` and `grad_*`: log10(‖·^(1)‖/‖·^(L)‖), the slope of log10‖·^(l)‖ against l (decades per
      layer) and the per-layer gain 10**slope, for δ^(l) and ∂L/∂W^(l), at the first probe step with a
      complete finite profile (`_init`, normally step 0) and at the last one (`_end`); `init_step` and
      `end_step` say which steps (those of ∂L/∂W);
    - `diverged` (outcome == 'diverged') and `diverged_step` (the tag, else the diverged/step metric);
    - `final_val_loss` (the last val/loss of a completed run, from the dynamics, else the run's final
      metric; NaN for a diverged or failed one, so a median of final losses is over runs that
      finished), `best_val_loss` and `best_val_step` (the lowest finite val/loss in the dynamics).
    """
    out = runs.copy()
    index = pd.Index(out["run_id"].astype(str))
    for name, quantity in (("delta", "delta_norm"), ("grad", "grad_norm")):
        found = profiles(dynamics, quantity).sort_values(["run_id", "step"], kind="stable")
        for when, pick in (("init", "first"), ("end", "last")):
            at = found.groupby("run_id").agg(pick).reindex(index)
            out[f"{name}_log10_ratio_{when}"] = at["log10_ratio"].to_numpy(dtype=float)
            out[f"{name}_slope_{when}"] = at["slope"].to_numpy(dtype=float)
            out[f"{name}_gain_{when}"] = 10.0 ** out[f"{name}_slope_{when}"]
            out[f"{when}_step"] = pd.array(at["step"].to_numpy(dtype=float), dtype="Int64")
    outcome = out["outcome"] if "outcome" in out else pd.Series(None, index=out.index, dtype=object)
    out["diverged"] = (outcome == "diverged").to_numpy(dtype=bool)
    tagged = out["diverged_step"] if "diverged_step" in out else pd.Series(pd.NA, index=out.index)
    logged = pd.array(first_value(dynamics, "diverged/step").reindex(index).to_numpy(), dtype="Int64")
    out["diverged_step"] = pd.array(tagged, dtype="Int64").fillna(pd.Series(logged, index=out.index))

    val = dynamics.loc[dynamics["quantity"] == "val/loss", ["run_id", "step", "value"]]
    val = val.assign(run_id=val["run_id"].astype(object)).sort_values(["run_id", "step"], kind="stable")
    last = val.groupby("run_id")["value"].last().reindex(index).to_numpy(dtype=float)
    if "val/loss" in out:  # no val/loss in the dynamics (filtered out): the run's final metric
        last = np.where(np.isnan(last), out["val/loss"].to_numpy(dtype=float), last)
    out["final_val_loss"] = np.where((outcome == "completed").to_numpy(dtype=bool), last, np.nan)
    finite = val[np.isfinite(val["value"])]
    best = finite.loc[finite.groupby("run_id")["value"].idxmin()].set_index("run_id").reindex(index)
    out["best_val_loss"] = best["value"].to_numpy(dtype=float)
    out["best_val_step"] = pd.array(best["step"].to_numpy(dtype=float), dtype="Int64")
    out.attrs.update(runs.attrs)
    return out


def first_value(dynamics: pd.DataFrame, quantity: str) -> pd.Series:
    """The first value of a network-level quantity per run, indexed by run_id."""
    rows = dynamics.loc[dynamics["quantity"] == quantity, ["run_id", "step", "value"]]
    rows = rows.assign(run_id=rows["run_id"].astype(object)).sort_values("step", kind="stable")
    return rows.groupby("run_id")["value"].first()


# --------------------------------------------------------------------------------------------------
# Across runs


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, ci: float = 0.95, n_boot: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean (NaN dropped): resample the values with
    replacement n_boot times, take the (1-ci)/2 and (1+ci)/2 quantiles of the resampled means.
    (nan, nan) for fewer than two values: one seed gives no interval."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)  # (n_boot,)
    lo, hi = np.quantile(means, [(1 - ci) / 2, (1 + ci) / 2])
    return float(lo), float(hi)


def aggregate(
    summary: pd.DataFrame,
    by: Sequence[str] | str | None = None,
    values: Sequence[str] | str = ("final_val_loss", "best_val_loss", "delta_log10_ratio_init"),
    *,
    ci: float = 0.95,
    n_boot: int = 10_000,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per config (the `by` columns; default: config_columns, i.e. everything but the seed):
    n_runs, share_diverged, and for each of `values` its n (non-NaN runs), mean, median and the
    bootstrap CI of the mean: `<value>_n`, `_mean`, `_median`, `_lo`, `_hi`."""
    by = [by] if isinstance(by, str) else list(config_columns(summary) if by is None else by)
    values = [values] if isinstance(values, str) else list(values)
    keyed = summary.assign(_all="all runs") if not by else summary
    keys = by or ["_all"]
    rows = []
    for key, group in keyed.groupby(keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(keys, key, strict=True))
        row["n_runs"] = len(group)
        row["share_diverged"] = float(group["diverged"].mean()) if "diverged" in group else math.nan
        for value in values:
            x = group[value].to_numpy(dtype=np.float64)
            x = x[~np.isnan(x)]
            lo, hi = bootstrap_ci(x, ci, n_boot, seed)
            row[f"{value}_n"] = len(x)
            row[f"{value}_mean"] = float(x.mean()) if len(x) else math.nan
            row[f"{value}_median"] = float(np.median(x)) if len(x) else math.nan
            row[f"{value}_lo"], row[f"{value}_hi"] = lo, hi
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.drop(columns="_all") if not by else table


def pivot(
    frame: pd.DataFrame,
    index: Sequence[str] | str,
    columns: Sequence[str] | str = (),
    values: str = "final_val_loss",
    aggfunc: str | Callable[[pd.Series], Any] = "median",
) -> pd.DataFrame:
    """values aggregated over runs, `index` down and `columns` across, e.g. depth × (activation, init)
    -> median final loss; `values='diverged', aggfunc='mean'` gives the share diverged. Missing
    param values (null) stay as group keys; a cell with no run is NaN."""
    index = [index] if isinstance(index, str) else list(index)
    columns = [columns] if isinstance(columns, str) else list(columns)
    series = frame[values]
    if series.dtype == bool or str(series.dtype) == "boolean":
        series = series.astype("float64")
    table = series.groupby([frame[k] for k in [*index, *columns]], dropna=False, sort=True).agg(aggfunc)
    if columns:
        table = table.unstack([len(index) + i for i in range(len(columns))])
    return table.to_frame() if isinstance(table, pd.Series) else table


RANK_VALUES = ["final_val_loss", "best_val_loss", "delta_log10_ratio_init"]


def rank_configs(
    summary: pd.DataFrame, by: Sequence[str] | None = None, *, ci: float = 0.95, n_boot: int = 10_000
) -> pd.DataFrame:
    """The configs ranked by outcome: fewest diverged first, then lowest median final val loss.

    Columns: rank, config (a label), the `by` columns (default: config_columns), n_runs, completed and
    diverged (counts), diagnosis ('vanishing ×2, healthy ×1', most common first), the median
    delta_log10_ratio_init, the median, mean and CI of final_val_loss, the median best_val_loss.
    """
    by = list(config_columns(summary) if by is None else by)
    table = aggregate(summary, by, RANK_VALUES, ci=ci, n_boot=n_boot)
    keyed = summary.assign(config=config_label(summary, by), _all="all runs")
    for name in ("outcome", "diagnosis"):
        if name not in keyed:
            keyed[name] = "unknown"
    extra = [  # the same groupby as aggregate's, so the rows line up
        {
            "config": group["config"].iloc[0],
            "completed": int((group["outcome"] == "completed").sum()),
            "diverged": int((group["outcome"] == "diverged").sum()),
            "diagnosis": counts_text(group["diagnosis"]),
        }
        for _, group in keyed.groupby(by or ["_all"], dropna=False, sort=True)
    ]
    table = pd.concat([table, pd.DataFrame(extra, index=table.index)], axis=1)
    table = table.sort_values(
        ["share_diverged", "final_val_loss_median", "best_val_loss_median"], na_position="last", kind="stable"
    ).reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    columns = [
        "rank",
        "config",
        *by,
        "n_runs",
        "completed",
        "diverged",
        "diagnosis",
        "delta_log10_ratio_init_median",
        "final_val_loss_median",
        "final_val_loss_mean",
        "final_val_loss_lo",
        "final_val_loss_hi",
        "best_val_loss_median",
    ]
    return table[columns]


def counts_text(values: pd.Series) -> str:
    counts = values.fillna("unknown").astype(str).value_counts(sort=True)
    counts = counts.sort_index(kind="stable").sort_values(ascending=False, kind="stable")
    return ", ".join(f"{name} ×{n}" for name, n in counts.items())
