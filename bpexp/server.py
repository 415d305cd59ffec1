"""One command for a shared MLflow tracking server, for a team or a sweep over many processes.

    bpexp-server                                         # SQLite: ./mlflow-server/mlflow.db, port 5000
    bpexp-server --host 0.0.0.0                          # reachable from other machines (a cluster's jobs)
    bpexp-server --port 5001 --store postgresql+psycopg://bpexp:secret@db-host/bpexp
    python -m bpexp.train -m tracking.uri=http://127.0.0.1:5000 seed=0,1,2    # then sweeps write there

SQLite is the default backend; for PostgreSQL give its SQLAlchemy URI with --store (the driver is
`pip install "psycopg[binary]"`, URI scheme postgresql+psycopg://). Artifacts are served by the server
itself (--artifacts-destination), so clients need no access to its disk. On PostgreSQL each worker keeps
up to 40 connections (PostgreSQL's default max_connections, 100, holds two workers).

Starting fast: `--workers 1` and MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false bring the start from ~60 s to
~10 s on a small machine (the default starts 4 workers and a job runner). The script waits for /health,
prints `ready <uri>`, and stops the server (and its workers) on Ctrl-C or SIGTERM.

The server listens on 127.0.0.1 unless --host says otherwise: MLflow's server has no authentication, so
anyone who can reach the port can read and delete every run. Expose it only on a trusted network.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DB_CONNECTIONS = 40  # per worker: as many as the threads a worker answers requests with (anyio's 40)


def server_command(
    port: int, store: str, artifacts: Path, workers: int = 1, host: str = "127.0.0.1"
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        host,
        "--port",
        str(port),
        "--backend-store-uri",
        store,
        "--artifacts-destination",
        str(artifacts),
        "--workers",
        str(workers),
    ]


def wait_healthy(uri: str, process: subprocess.Popen, timeout: float = 120.0) -> float:
    """Seconds until GET /health answers; raises if the server exits or the time runs out."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with status {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter() - start
        except OSError:
            time.sleep(0.2)  # polling a port: there is nothing to wait on
    raise TimeoutError(f"mlflow server at {uri} did not answer /health within {timeout:.0f} s")


def stop_server(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the server's process group (its uvicorn/gunicorn workers too); SIGKILL if it hangs."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:  # (also where a signal handler waits inside main's own wait)
        os.killpg(process.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface)",
    )
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    parser.add_argument(
        "--dir", type=Path, default=Path("mlflow-server"), help="folder for the SQLite file and artifacts"
    )
    parser.add_argument("--store", default=None, help="backend store URI (default sqlite:///<dir>/mlflow.db)")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes (default 1)")
    args = parser.parse_args(argv)

    folder = args.dir.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    store = args.store or f"sqlite:///{folder}/mlflow.db"
    everywhere = args.host in ("0.0.0.0", "::")
    local = f"http://{'127.0.0.1' if everywhere else args.host}:{args.port}"  # where we poll /health
    uri = f"http://{socket.gethostname() if everywhere else args.host}:{args.port}"  # what jobs use
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if not store.startswith("sqlite"):
        # SQLAlchemy's default pool (5 + 10 overflow) makes the 16th of 16 writers at once wait, and on a
        # busy machine fail after 30 s ("QueuePool limit … reached"): one connection per request thread.
        env.setdefault("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", str(DB_CONNECTIONS))
        env.setdefault("MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW", "0")
    env.pop("MLFLOW_TRACKING_URI", None)
    command = server_command(args.port, store, folder / "artifacts", args.workers, args.host)
    # Its own process group, so that stopping it stops its uvicorn/gunicorn workers too.
    process = subprocess.Popen(command, env=env, stdout=sys.stderr, start_new_session=True)  # stdout: ours

    def interrupt(signum: int, frame: object) -> None:
        # Only unwind here: stop_server's wait inside the handler would spin on the lock that the
        # interrupted process.wait() holds, and give up only after its whole timeout (20 s).
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        seconds = wait_healthy(local, process)
        print(f"ready {uri} (store {store}, started in {seconds:.1f} s)", flush=True)
        print(f"  sweep into it: python -m bpexp.train -m tracking.uri={uri} ...", flush=True)
        print(f"  UI: {uri}", flush=True)
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(process)


if __name__ == "__main__":
    sys.exit(main())
