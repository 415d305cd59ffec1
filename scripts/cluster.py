"""A laptop-sized cluster from Debian's packages: one-node SLURM, PostgreSQL, and bpexp-server on it.

    apt-get install slurm-wlm munge postgresql             # once (as root; .ci/run does it)
    python scripts/cluster.py                              # as root: starts it all, prints what to export

Everything lives in one temporary folder and stops on Ctrl-C or SIGTERM, each service by its own PID:
- munged with a key made on the spot (its own socket: the system's munge, if any, is left alone);
- slurmctld and slurmd for one node (this host, at 127.0.0.1) with a `cpu` partition: no cgroups
  (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none), state, spool and logs in the folder;
- `sacct` for submitit: it asks sacct whether a job ended, and sacct needs slurmdbd and a database.
  The folder's bin/sacct answers sacct's three columns (JobID|State|NodeList) from `scontrol show job`,
  what the controller itself holds (finished jobs for MinJobAge, an hour here);
- PostgreSQL (initdb in the folder, a loopback port, a fresh database `bpexp`); PostgreSQL refuses to
  run as root, so as root it runs as the `postgres` user;
- bpexp-server on that database (`--store postgresql+psycopg://…`, the psycopg driver from pip).

The SLURM clients (sbatch, squeue, scancel) and submitit find this cluster through $SLURM_CONF and the
folder's bin/ first on $PATH: `Cluster.env()`, or the two `export` lines the script prints.
tests/test_cluster.py starts one per test module through `Cluster`.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PG_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin"))  # Debian keeps initdb off $PATH
SLURM_DAEMONS = ("munged", "slurmctld", "slurmd")
SLURM_CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "sinfo")
CPUS = 8  # the node's declared cores: jobs of 1 core each, 8 at once whatever the machine has
# Seconds between SIGTERM and SIGKILL (scancel, a time limit), SLURM's default: a job ends as soon as
# its run is closed; 5 s was too short for that on 2 busy cores (figures, the writer's drain).
KILL_WAIT = 30

SACCT = r"""#!/bin/sh
# sacct for a cluster without slurmdbd: JobID|State|NodeList from the controller (scontrol show job).
# submitit calls: sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]
echo 'JobID|State|NodeList'
while [ $# -gt 0 ]; do
  [ "$1" = -j ] && scontrol -o show job "$2" 2>/dev/null | awk '{
    for (i = 1; i <= NF; i++) { n = index($i, "="); f[substr($i, 1, n - 1)] = substr($i, n + 1) }
    task = f["ArrayTaskId"]; sub(/%.*/, "", task)
    if (task == "") id = f["JobId"]
    else if (task ~ /[-,]/) id = f["ArrayJobId"] "_[" task "]"
    else id = f["ArrayJobId"] "_" task
    print id "|" f["JobState"] "|" f["NodeList"]
    split("", f) }'
  shift
done
"""


def missing() -> list[str]:
    """What this machine lacks to start a cluster (empty: everything is there)."""
    lacking = [name for name in (*SLURM_DAEMONS, *SLURM_CLIENTS) if not find(name)]
    if not PG_BIN:
        lacking.append("postgresql (initdb, postgres)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        lacking.append('psycopg (pip install "psycopg[binary]")')
    if os.geteuid() != 0:
        lacking.append("root (slurmd starts jobs as their user)")
    return lacking


def find(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(what: str, ready, processes: list[subprocess.Popen], log: Path, timeout: float = 60) -> None:
    """Poll `ready()` until it holds; fail naming the service and the tail of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        for process in processes:
            if process.poll() is not None:
                break
        else:
            time.sleep(0.2)  # a daemon coming up: nothing to wait on but its port
            continue
        break
    tail = log.read_text()[-2000:] if log.exists() else "(no log)"
    raise RuntimeError(f"{what} did not start within {timeout:.0f} s; {log}:\n{tail}")


@dataclass
class Cluster:
    folder: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    pg_port: int = 0
    server_port: int = 0

    # ---- paths and addresses --------------------------------------------------------------------

    @property
    def slurm_conf(self) -> Path:
        return self.folder / "slurm" / "slurm.conf"

    @property
    def store(self) -> str:
        """The SQLAlchemy URI of the database bpexp-server writes to."""
        return f"postgresql+psycopg://bpexp@127.0.0.1:{self.pg_port}/bpexp"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment whose SLURM clients (and submitit) talk to this cluster."""
        base = dict(os.environ if base is None else base)
        path = f"{self.folder / 'bin'}:{base.get('PATH', '')}:/usr/sbin"
        return {**base, "SLURM_CONF": str(self.slurm_conf), "PATH": path}

    # ---- start and stop --------------------------------------------------------------------------

    @classmethod
    def start(cls, folder: Path | None = None) -> Cluster:
        lacking = missing()
        if lacking:
            raise RuntimeError(f"cannot start a cluster, missing: {', '.join(lacking)}")
        folder = Path(folder or tempfile.mkdtemp(prefix="bpexp-cluster-"))
        folder.chmod(0o755)  # the postgres user reaches its data folder through it
        cluster = cls(folder)
        try:
            cluster.start_munge()
            cluster.start_slurm()
            cluster.start_postgres()
            cluster.start_server()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def spawn(self, name: str, command: list[str], **kwargs) -> subprocess.Popen:
        log = (self.folder / f"{name}.log").open("a")
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )
        self.processes[name] = process
        return process

    def start_munge(self) -> None:
        munge = self.folder / "munge"
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))  # a fresh key: this cluster trusts no other
        key.chmod(0o400)
        self.spawn(
            "munged",
            [
                find("munged"),
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={munge / 'munge.socket'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--seed-file={munge / 'munged.seed'}",
                f"--log-file={self.folder / 'munged.daemon.log'}",
            ],
        )
        wait_for(
            "munged", (munge / "munge.socket").exists, [self.processes["munged"]], self.folder / "munged.log"
        )

    def start_slurm(self) -> None:
        slurm = self.folder / "slurm"
        for sub in ("state", "spool"):
            (slurm / sub).mkdir(parents=True)
        (self.folder / "bin").mkdir()
        sacct = self.folder / "bin" / "sacct"
        sacct.write_text(SACCT)
        sacct.chmod(0o755)
        host = socket.gethostname().split(".")[0]
        user = pwd.getpwuid(os.getuid()).pw_name
        settings = {
            "ClusterName": "bpexp",
            "SlurmctldHost": f"{host}(127.0.0.1)",
            "SlurmctldPort": free_port(),
            "SlurmdPort": free_port(),
            "SlurmUser": user,
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.folder / 'munge' / 'munge.socket'}",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",  # cores are what a job holds; memory is not counted
            "SlurmdParameters": "config_overrides",  # the node's CPUs as declared here
            "StateSaveLocation": slurm / "state",
            "SlurmdSpoolDir": slurm / "spool",
            "SlurmctldPidFile": slurm / "slurmctld.pid",
            "SlurmdPidFile": slurm / "slurmd.pid",
            "SlurmctldLogFile": self.folder / "slurmctld.daemon.log",
            "SlurmdLogFile": self.folder / "slurmd.daemon.log",
            "KillWait": KILL_WAIT,
            "MinJobAge": 3600,  # finished jobs stay visible to scontrol (and so to sacct above)
            "ReturnToService": 2,
            "MpiDefault": "none",
            "MailProg": "/bin/true",
            "SchedulerParameters": "sched_interval=1",  # a sweep starts within a second
        }
        lines = [f"{key}={value}" for key, value in settings.items()]
        lines.append(f"NodeName={host} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory=1000000 State=UNKNOWN")
        lines.append(f"PartitionName=cpu Nodes={host} Default=YES MaxTime=INFINITE State=UP")
        self.slurm_conf.write_text("\n".join(lines) + "\n")
        env = self.env()
        self.spawn("slurmctld", [find("slurmctld"), "-D", "-c", "-f", str(self.slurm_conf)], env=env)
        self.spawn("slurmd", [find("slurmd"), "-D", "-N", host, "-f", str(self.slurm_conf)], env=env)

        def idle() -> bool:
            done = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, check=False
            )
            return done.stdout.strip() == "idle"

        daemons = [self.processes["slurmctld"], self.processes["slurmd"]]
        wait_for("slurmctld and slurmd", idle, daemons, self.folder / "slurmctld.daemon.log")

    def start_postgres(self) -> None:
        data, sockets = self.folder / "postgres" / "data", self.folder / "postgres" / "run"
        sockets.mkdir(parents=True)
        self.pg_port = free_port()
        # PostgreSQL refuses to run as root: as root, its own user runs it.
        user = "postgres" if os.geteuid() == 0 else None
        if user:
            pw = pwd.getpwnam(user)
            for path in (self.folder / "postgres", sockets):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        bin_dir = PG_BIN[-1]
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "bpexp", "--auth=trust", "--no-sync"]
        with (self.folder / "initdb.log").open("w") as log:
            subprocess.run(initdb, user=user, stdout=log, stderr=subprocess.STDOUT, check=True, cwd="/")
        command = [str(bin_dir / "postgres"), "-D", str(data), "-p", str(self.pg_port), "-k", str(sockets)]
        command += ["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"]
        self.spawn("postgres", command, user=user, cwd="/")

        def accepts() -> bool:
            check = [str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.pg_port)]
            return subprocess.run(check, check=False).returncode == 0

        wait_for("postgres", accepts, [self.processes["postgres"]], self.folder / "postgres.log")
        create = [
            str(bin_dir / "createdb"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.pg_port),
            "-U",
            "bpexp",
            "bpexp",
        ]
        subprocess.run(create, check=True, capture_output=True)

    def start_server(self) -> None:
        """bpexp-server on the database; `ready …` on its stdout once /health answers."""
        self.server_port = self.server_port or free_port()
        command = [sys.executable, "-m", "bpexp.server", "--port", str(self.server_port)]
        command += ["--store", self.store, "--dir", str(self.folder / "server")]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        log = self.folder / "bpexp-server.log"
        process = self.spawn("bpexp-server", command, env=env)
        wait_for("bpexp-server", lambda: "ready http" in log.read_text(), [process], log, timeout=180)

    def stop_server(self) -> None:
        """SIGTERM to bpexp-server alone: it stops its own mlflow server (a restart: start_server)."""
        stop(self.processes.pop("bpexp-server", None))

    def stop(self, remove: bool = False) -> None:
        """Every service, the last started first, each by its own PID; the folder too if `remove`."""
        for name in reversed(list(self.processes)):
            stop(self.processes.pop(name))
        if remove:
            shutil.rmtree(self.folder, ignore_errors=True)


def stop(process: subprocess.Popen | None, timeout: float = 20) -> None:
    """SIGTERM (PostgreSQL: a fast shutdown), SIGKILL if it hangs; then reap it."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="folder for everything (default: a new temp one)"
    )
    args = parser.parse_args(argv)
    lacking = missing()
    if lacking:
        print(f"cluster: missing {', '.join(lacking)}", file=sys.stderr)
        return 2
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cluster = Cluster.start(args.dir)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        print(f"ready in {time.perf_counter() - start:.1f} s: {cluster.folder}", flush=True)
        print(f"  export SLURM_CONF={cluster.slurm_conf} PATH={cluster.folder / 'bin'}:$PATH")
        print(f"  tracking server {cluster.tracking_uri} (store {cluster.store})")
        print(
            "  python -m bpexp.train -m hydra/launcher=slurm seed=0,1,2,3 "
            f"tracking.uri={cluster.tracking_uri}",
            flush=True,
        )
        while all(p.poll() is None for p in cluster.processes.values()):
            time.sleep(1)  # Ctrl-C or SIGTERM ends the wait
        gone = [name for name, p in cluster.processes.items() if p.poll() is not None]
        print(f"cluster: {', '.join(gone)} exited; see {cluster.folder}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.stop(remove=args.dir is None)


if __name__ == "__main__":
    sys.exit(main())
