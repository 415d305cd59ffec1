"""One training run, in story order: config, device, data, model, optimizer, probes, tracker, the loop.

`train(cfg)` does the work and returns a RunResult; `main()` is the thin `@hydra.main` shim that returns
the final validation loss (always finite, for sweepers: a diverged run scores DIVERGED_OBJECTIVE).
"""

from __future__ import annotations

import io
import logging
import math
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from bpexp.backprop import check_supported, gradcheck, manual_backward
from bpexp.config import Config, ConfigError, Device, Engine, config_hash, flatten, to_config
from bpexp.data import Dataset, make_data
from bpexp.model import MLP, build_mlp, first_nonfinite_layer
from bpexp.optim import build_optimizer, clip_gradients
from bpexp.probes import Dynamics, Probes, diagnose
from bpexp.progress import Progress
from bpexp.theory import predict
from bpexp.tracking import NullTracker, make_tracker, sweep_link

log = logging.getLogger("bpexp.train")  # not __main__ under python -m
THEORY_TOLERANCE = 0.5  # decades: measured δ ratio at step 0 this close to the prediction "agrees"
DIVERGED_OBJECTIVE = 1e300  # finite and worse than any float32 loss: what a sweeper sees for a NaN run
STATUS = {"completed": "FINISHED", "diverged": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


@dataclass
class RunResult:
    outcome: str  # completed | diverged | failed | killed
    diagnosis: str  # healthy | vanishing | exploding | saturated | dead_units | diverged
    initial: dict[str, float] = field(default_factory=dict)  # the probes at initialization (step 0)
    metrics: dict[str, float] = field(default_factory=dict)  # the last value of every metric
    run_id: str | None = None
    steps: int = 0  # optimizer steps taken
    diverged_step: int | None = None
    diverged_layer: int | None = None
    seconds: float = 0.0  # wall time of the whole run, from the store's run creation to its end
    loop_seconds: float = 0.0  # the training loop alone: steps, probes, evaluation and metric logging
    out_dir: Path | None = None  # where the artifacts were written
    ui_url: str | None = None  # this run's page in the MLflow UI
    tracking_uri: str | None = None

    @property
    def objective(self) -> float:
        loss = self.metrics.get("val/loss", self.metrics.get("train/loss", math.nan))
        return loss if self.outcome == "completed" and math.isfinite(loss) else DIVERGED_OBJECTIVE


def train(
    cfg: Config, launch_dir: Path | None = None, out_dir: Path | None = None, progress: bool = False
) -> RunResult:
    launch_dir = launch_dir or Path.cwd()
    out_dir = out_dir or Path(tempfile.mkdtemp(prefix="bpexp-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = make_tracker(cfg.tracking, launch_dir)  # fails here, before any run, if unreachable

    torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = getattr(torch, cfg.train.dtype.value)

    data = make_data(cfg.data, cfg.seed).to(device, dtype)
    model = build_mlp(cfg.model, data.in_dim, data.out_dim).to(device, dtype)
    optimizer, schedule = build_optimizer(cfg.optim, model.parameters(), cfg.train.steps)
    engine = cfg.train.engine
    if engine == Engine.manual or cfg.probes.gradcheck_every:
        check_supported(model)  # the hand-written backward has no normalization layers
    probes = Probes(model, cfg.probes.every, cfg.probes.enabled)
    prediction = predict(cfg.model, data.in_dim, data.out_dim, float(data.x_train.pow(2).mean()))
    theory = prediction.metrics() if prediction else {}
    dynamics = Dynamics()
    batches = minibatches(data, cfg.train.batch_size, cfg.seed)

    def record(metrics: dict[str, float], step: int) -> None:
        dynamics.add(step, metrics)
        tracker.log_metrics(metrics, step)
        result.metrics.update(metrics)

    result = RunResult(outcome="completed", diagnosis="healthy")
    start = time.perf_counter()
    config = {k: v for k, v in flatten(cfg).items() if not k.startswith("sweep.")}  # how, not what
    params = {**config, **(prediction.params() if prediction else {})}
    with sigterm_as_interrupt():  # from the run's creation on, SIGTERM ends it KILLED, never RUNNING
        try:
            tags = {
                "bpexp.outcome": "running",
                "bpexp.diagnosis": "pending",
                "bpexp.config_hash": config_hash(cfg),
            }
            tracker.start(run_name(cfg), params, tags)
            result.out_dir, result.tracking_uri = out_dir, tracker.uri  # the run id comes with finish()
            where = tracker.uri or "not tracked"
            log.info(
                "run %s started (%s): L=%d, %d steps", run_name(cfg), where, model.n_layers, cfg.train.steps
            )
            bar = Progress(cfg.train.steps, run_name(cfg), stream=sys.stderr if progress else io.StringIO())
            losses: dict[int, float] = {}  # since the last probe: logged only if the run diverges
            loop_start = time.perf_counter()
            for step in range(cfg.train.steps + 1):  # the last pass only probes the trained net
                last = step == cfg.train.steps
                if step % cfg.train.eval_every == 0 or last:
                    record(evaluate(model, data), step)
                probing = probes.due(step, cfg.train.steps)
                if last and not probing:
                    break
                x, y = next(batches)
                step_pass = backprop_pass(model, x, y, data, engine, probing)
                # One host sync per step: divergence is recorded at the step where it starts.
                loss = step_pass.loss.item()
                if not math.isfinite(loss):
                    for at, value in losses.items():  # the climb to divergence, visible in the charts
                        record({"train/loss": value}, at)
                    diverged(result, step, model, x)
                    break
                losses[step] = loss
                if probing:
                    scalars = {"train/loss": step_pass.loss, **accuracy(data, step_pass.out, y, "train")}
                    probes.read(step_pass.delta, step_pass.activations, scalars)
                if cfg.probes.gradcheck_every and step % cfg.probes.gradcheck_every == 0:
                    record({"gradcheck/max_rel_err": gradcheck(model, x, y, data.classification)}, step)
                if not last:
                    clip_gradients(model.parameters(), cfg.optim.clip_norm)
                    optimizer.step()
                    schedule.step()
                    result.steps = step + 1
                bar.update(result.steps)
                if probing:
                    losses.clear()
                    metrics = probes.collect(stepped=not last)
                    bar.fields.update(progress_fields(metrics))
                    if step == 0:
                        result.initial = metrics
                        metrics = {**metrics, **theory}
                    record(metrics, step)
                    if not math.isfinite(metrics["grad_norm/total"]):
                        diverged(result, step, model, x)
                        break
                optimizer.zero_grad(set_to_none=True)
            tracker.flush()
            result.loop_seconds = time.perf_counter() - loop_start
            bar.close()
            result.diagnosis = "diverged" if result.outcome == "diverged" else diagnose(result.metrics)
        except KeyboardInterrupt:
            result.outcome = "killed"
            raise
        except Exception:
            result.outcome = "failed"
            (out_dir / "traceback.txt").write_text(traceback.format_exc())
            tracker.log_artifact(out_dir / "traceback.txt")
            raise
        finally:
            try:
                finish(cfg, result, dynamics, tracker, out_dir)
            finally:
                result.seconds = time.perf_counter() - start
    return result


@dataclass
class Pass:
    """One forward and backward pass; delta and activations are filled on probe steps only."""

    loss: torch.Tensor
    out: torch.Tensor  # a^(L), (batch, out_dim)
    delta: list[torch.Tensor]  # δ^(1) … δ^(L)
    activations: list[torch.Tensor]  # f(z^(1)) … f(z^(L-1)) before dropout, then a^(L) = z^(L)


def backprop_pass(
    model: MLP, x: torch.Tensor, y: torch.Tensor, data: Dataset, engine: Engine, probing: bool
) -> Pass:
    """Fill every .grad with ∂L/∂θ, by autograd or by the hand-written equations of backprop.py."""
    if engine == Engine.manual:
        manual = manual_backward(model, x, y, data.classification)
        z, out = manual.forward.z, manual.forward.z[-1]
        hidden = [model.f(z_l) for z_l in z[:-1]] if probing else []
        return Pass(manual.loss, out, manual.delta, [*hidden, out])
    if not probing:
        out = model(x)
        loss = loss_fn(data, out, y)
        loss.backward()  # a non-finite loss gives non-finite grads; the loop stops before they are used
        return Pass(loss, out, [], [])
    model.keep_z = True  # autograd keeps z^(l) and its gradient δ^(l) on probe steps
    out = model(x)
    loss = loss_fn(data, out, y)
    loss.backward()
    delta, activations = [z.grad for z in model.z], [*model.a, out.detach()]
    model.keep_z, model.z, model.a = False, [], []
    return Pass(loss, out, delta, activations)


def progress_fields(metrics: dict[str, float]) -> dict[str, str]:
    """What the progress bar shows after a probe: the batch loss, the δ ratio, the diagnosis so far."""
    return {
        "loss": f"{metrics['train/loss']:.4g}",
        "δ": f"10^{metrics['delta/log10_ratio']:+.1f}",
        "": diagnose(metrics),
    }


def diverged(result: RunResult, step: int, model: MLP, x: torch.Tensor) -> None:
    result.outcome, result.diverged_step = "diverged", step
    result.diverged_layer = first_nonfinite_layer(model, x)


def finish(cfg: Config, result: RunResult, dynamics: Dynamics, tracker: NullTracker, out_dir: Path) -> None:
    """Tags, the divergence record, artifacts, then the run's final status: also after a failure."""
    try:
        result.run_id, result.ui_url = tracker.run_id, tracker.run_url()  # the recorder's answer
        tags = {"bpexp.outcome": result.outcome, "bpexp.diagnosis": result.diagnosis}
        if result.initial:
            tags["bpexp.diagnosis_init"] = diagnose(result.initial)
            tags["bpexp.theory"] = theory_check(result)
        if result.diverged_step is not None:
            tags["bpexp.diverged_step"] = str(result.diverged_step)
            tags["bpexp.diverged_layer"] = str(result.diverged_layer)
            tracker.log_metrics({"diverged/step": result.diverged_step}, result.diverged_step)
        tags["mlflow.note.content"] = summary(result, cfg)  # the run's Description in the MLflow UI
        tracker.set_tags(tags)
        if result.outcome in ("completed", "diverged"):
            for path, folder in write_artifacts(cfg, result, dynamics, out_dir):
                tracker.log_artifact(path, folder)
    finally:
        tracker.end(STATUS[result.outcome])


def write_artifacts(
    cfg: Config, result: RunResult, dynamics: Dynamics, out_dir: Path
) -> list[tuple[Path, str | None]]:
    import matplotlib.pyplot as plt  # at the end only: 1 s of start-up otherwise

    from bpexp.figures import gradient_profile_figure

    (out_dir / "plots").mkdir(exist_ok=True)
    config_path = out_dir / "config.yaml"
    config_path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    frame = dynamics.frame()  # built once: for the Parquet file and for the figure
    frame.to_parquet(out_dir / "dynamics.parquet", index=False)
    artifacts = [(config_path, None), (out_dir / "dynamics.parquet", None)]
    if (frame["quantity"] == "delta_norm").any():
        fig = gradient_profile_figure(frame, title=f"{run_name(cfg)}: {result.outcome}, {result.diagnosis}")
        fig.savefig(out_dir / "plots" / "gradient_profile.png", dpi=110)
        plt.close(fig)
        artifacts.append((out_dir / "plots" / "gradient_profile.png", "plots"))
    return artifacts


def theory_check(result: RunResult) -> str:
    """Does the δ ratio measured at initialization match the mean-field prediction? (theory.py)"""
    predicted = result.metrics.get("theory/delta_log10_ratio")
    measured = result.initial.get("delta/log10_ratio")
    if predicted is None or measured is None:
        return "no prediction"
    return "agrees" if abs(measured - predicted) <= THEORY_TOLERANCE else "differs"


def resolve_device(device: Device) -> torch.device:
    if device == Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == Device.cuda and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is not allowed here: no CUDA device is visible; use auto or cpu")
    return torch.device(device.value)


def minibatches(
    data: Dataset, batch_size: int | None, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled minibatches, epoch after epoch, from their own generator (init and dropout keep theirs)."""
    n = len(data.x_train)
    if batch_size is None or batch_size >= n:
        while True:
            yield data.x_train, data.y_train
    g = torch.Generator().manual_seed(seed + 1)
    while True:
        order = torch.randperm(n, generator=g).to(data.x_train.device)
        for i in range(0, n - batch_size + 1, batch_size):
            index = order[i : i + batch_size]
            yield data.x_train[index], data.y_train[index]


def loss_fn(data: Dataset, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification, MSE (mean over batch and outputs) for regression."""
    return F.cross_entropy(out, y) if data.classification else F.mse_loss(out, y)


def accuracy(data: Dataset, out: torch.Tensor, y: torch.Tensor, split: str) -> dict[str, torch.Tensor]:
    if not data.classification:
        return {}
    return {f"{split}/acc": (out.argmax(1) == y).to(torch.float64).mean()}


@torch.no_grad()
def evaluate(model: MLP, data: Dataset) -> dict[str, float]:
    """Validation loss (and accuracy), with dropout off and batch-norm running statistics."""
    if len(data.x_val) == 0:
        return {}
    model.eval()
    out = model(data.x_val)
    model.train()
    metrics = {"val/loss": loss_fn(data, out, data.y_val), **accuracy(data, out, data.y_val, "val")}
    return {key: float(value) for key, value in metrics.items()}


def run_name(cfg: Config) -> str:
    """<data>-d<depth>w<width>-<activation>-<init>-<optim>-s<seed>, unless tracking.run_name is set."""
    m = cfg.model
    default = (
        f"{cfg.data.name.value}-d{m.depth}w{m.width}-{m.activation.value}-{m.init.value}"
        f"-{cfg.optim.name.value}-s{cfg.seed}"
    )
    return cfg.tracking.run_name or default


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (scancel, kill, a launcher's shutdown) unwinds like Ctrl-C, so the run ends KILLED."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def summary(result: RunResult, cfg: Config) -> str:
    """The few lines a user reads at the end of a run; the numbers are the run's own metrics."""
    m, init = result.metrics, result.initial
    lines = [
        f"bpexp run {run_name(cfg)} ({result.run_id or 'not tracked'}): {result.outcome}, {result.diagnosis}"
    ]
    if why := diagnosis_reason(result):
        lines.append(f"  {why}")
    if "delta/log10_ratio" in init:
        L = sum(k.startswith("delta_norm/l") for k in init)
        line = f"  δ from layer {L} to layer 1: 10^{init['delta/log10_ratio']:+.2f} at init"
        if "theory/delta_log10_ratio" in m:
            line += f" (theory 10^{m['theory/delta_log10_ratio']:+.2f}: {theory_check(result)})"
        if result.steps and "delta/log10_ratio" in m:
            line += f", 10^{m['delta/log10_ratio']:+.2f} after training"
        lines.append(line)
    losses = [f"{k} {m[k]:.4g}" for k in ("val/loss", "val/acc") if k in m]
    if "train/loss" in init and result.steps:
        losses.insert(0, f"train/loss {init['train/loss']:.4g} at step 0, {m['train/loss']:.4g} at the end")
    elif "train/loss" in m:
        losses.insert(0, f"train/loss {m['train/loss']:.4g}")
    steps = f"{result.steps} step{'s' if result.steps != 1 else ''}"
    lines.append(f"  {', '.join(losses)}; {steps} in {result.seconds or result.loop_seconds:.1f} s")
    if result.out_dir is not None:
        lines.append(f"  artifacts: {result.out_dir} (config.yaml, dynamics.parquet, plots/)")
    if result.ui_url and result.tracking_uri and not result.tracking_uri.startswith("http"):
        lines.append(f"  open: mlflow ui --backend-store-uri {result.tracking_uri}, then {result.ui_url}")
    elif result.ui_url:
        lines.append(f"  open: {result.ui_url}")
    return "\n".join(lines)


def diagnosis_reason(result: RunResult) -> str:
    """The numbers behind a diagnosis that the δ line does not show."""
    m = result.metrics
    match result.diagnosis:
        case "diverged":
            step, layer = result.diverged_step, result.diverged_layer
            return f"loss non-finite at step {step}, first non-finite layer {layer}"
        case "dead_units":
            share, key = max((v, k) for k, v in m.items() if k.startswith("dead/l"))
            return f"{share:.0%} of the units of layer {int(key[6:])} are dead on the whole batch"
        case "saturated":
            shares = [v for k, v in m.items() if k.startswith("saturation/l")]
            return f"{sum(shares) / len(shares):.0%} of hidden units saturated (f' < 5% of its maximum)"
    return ""


def job_line(result: RunResult, num: int, overrides: list[str]) -> str:
    """One line per finished job of a sweep: index/total, overrides, outcome, final loss, seconds."""
    link = sweep_link() or {}
    total = f"/{link['jobs']}" if link.get("jobs") else ""
    loss = result.metrics.get("val/loss", result.metrics.get("train/loss", math.nan))
    return (
        f"[{num + 1}{total}] {' '.join(overrides)}: {result.outcome}, {result.diagnosis}, "
        f"loss {loss:.4g}, {result.seconds:.1f} s"
    )


def resumed(cfg: Config, launch_dir: Path) -> float | None:
    """sweep.resume=true: the objective of this config's FINISHED run, if the store has one (then skip)."""
    run = make_tracker(cfg.tracking, launch_dir).find_finished(config_hash(cfg))
    if run is None:
        return None
    tags = run.data.tags
    done = RunResult(tags.get("bpexp.outcome", "completed"), tags.get("bpexp.diagnosis", "healthy"))
    done.metrics, done.run_id = run.data.metrics, run.info.run_id
    log.info("run %s skipped (sweep.resume): FINISHED as %s, %s", run_name(cfg), done.run_id, done.outcome)
    return done.objective


CONF = str(Path(__file__).resolve().parents[1] / "conf")  # absolute: the same for every entry point


@hydra.main(version_base="1.3", config_path=CONF, config_name="train")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    launch_dir, out_dir = Path(hydra_cfg.runtime.cwd), Path(hydra_cfg.runtime.output_dir)
    try:
        config = to_config(cfg)
        if config.sweep.resume and (objective := resumed(config, launch_dir)) is not None:
            return objective
        if hydra_cfg.mode == RunMode.MULTIRUN and config.tracking.run_name is None:
            # In a sweep the runs differ by their overrides: lead with them (the UI cuts names short).
            config.tracking.run_name = f"{' '.join(hydra_cfg.overrides.task)} · {run_name(config)}"[:250]
        result = train(config, launch_dir, out_dir, progress=hydra_cfg.mode == RunMode.RUN)
    except ConfigError as err:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise  # one bad point of a sweep fails alone; bpexp/sweep.py records it as a FAILED child
        print(f"bpexp: {err}", file=sys.stderr)
        sys.exit(2)
    if hydra_cfg.mode == RunMode.RUN:
        print(summary(result, config))
    else:
        log.debug(summary(result, config))  # hydra.verbose=bpexp
        print(job_line(result, hydra_cfg.job.num, list(hydra_cfg.overrides.task)), flush=True)
    return result.objective


if __name__ == "__main__":
    main()
