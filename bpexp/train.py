"""One training run, in story order: config, device, data, model, optimizer, probes, tracker, the loop.

Over 400 lines: the loop, the run's lifecycle in the store and the command line's entry point, in the
order a run goes through them.

`train(cfg)` does the work and returns a RunResult; the run's lifecycle in the store (creation, tags,
artifacts, final status, a traceback on failure, SIGTERM) is one context manager, `recorded`, so the
loop reads as the happy path: steps, then one last evaluation and probe of the trained net. `main()` is
the thin `@hydra.main` shim that prints the summary (console.py) and returns the final validation loss
(always finite, for sweepers: a diverged run scores DIVERGED_OBJECTIVE).
"""

from __future__ import annotations

import gc
import io
import logging
import math
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from bpexp.backprop import check_supported, gradcheck, loss_value, manual_backward, resolve_loss
from bpexp.config import (
    Config,
    ConfigError,
    Device,
    Engine,
    Loss,
    check_override_keys,
    config_hash,
    flatten,
    plain,
    to_config,
)
from bpexp.console import job_line, progress_fields, summary
from bpexp.data import Dataset, make_data
from bpexp.lifecycle import kill_reason, sigterm_as_interrupt
from bpexp.model import MLP, build_mlp, first_nonfinite_layer
from bpexp.names import STATUS, Diagnosis, Metric, Outcome, Quantity, Tag, diagnosis_change, is_experiment
from bpexp.optim import build_optimizer, clip_gradients
from bpexp.probes import Dynamics, Instruments, Probes, diagnose, jacobian_theory, layer_signals
from bpexp.progress import Progress
from bpexp.result import DIVERGED_OBJECTIVE, RunResult
from bpexp.theory import Prediction, predict
from bpexp.tracking import NullTracker, StoreError, make_tracker, sweep_link

__all__ = ["DIVERGED_OBJECTIVE", "RunResult", "main", "train"]
log = logging.getLogger("bpexp.train")  # not __main__ under python -m


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
    engine, steps = cfg.train.engine, cfg.train.steps
    if engine == Engine.manual or cfg.probes.gradcheck_every:
        check_supported(model)  # the hand-written backward has no normalization layers
    loss = resolve_loss(cfg.train.loss, data.classification)  # a loss the data cannot take fails here
    probes = Probes(model, cfg.probes.every, cfg.probes.enabled)
    extra = instruments_for(cfg, model, data, loss)
    prediction = predict(cfg.model, data.in_dim, data.out_dim, float(data.x_train.pow(2).mean()))
    batches = minibatches(data, cfg.train.batch_size, cfg.seed)
    bar = Progress(steps, run_name(cfg), stream=sys.stderr if progress else io.StringIO())

    with recorded(cfg, tracker, out_dir, prediction) as run:
        for step in range(steps):
            if step % cfg.train.eval_every == 0:
                run.record(evaluate(model, data, loss), step)
            x, y = next(batches)
            probing = probes.due(step)
            step_pass = backprop_pass(model, x, y, data, engine, probing, loss, extra.noise)
            if not run.finite_loss(step_pass.loss, step, model, x):
                break
            if probing:
                probes.read(step_pass.delta, step_pass.activations, step_pass.scalars(data, y))
                read_noise(probes, extra, step_pass, data)
            run.gradcheck(cfg.probes.gradcheck_every, step, model, x, y, data.classification, loss)
            run.instruments(extra, step, x, y, data.classification, optimizer)
            clip_gradients(model.parameters(), cfg.optim.clip_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            run.result.steps = step + 1
            bar.update(step + 1)
            if probing and not run.probed(probes.collect(stepped=True), step, model, x, bar):
                break
        else:  # the trained net, once more: its validation loss and a probe without a step
            run.record(evaluate(model, data, loss), steps)
            if probes.enabled:
                x, y = next(batches)
                step_pass = backprop_pass(model, x, y, data, engine, True, loss, extra.noise)
                if run.finite_loss(step_pass.loss, steps, model, x):
                    probes.read(step_pass.delta, step_pass.activations, step_pass.scalars(data, y))
                    read_noise(probes, extra, step_pass, data)
                    run.gradcheck(cfg.probes.gradcheck_every, steps, model, x, y, data.classification, loss)
                    run.instruments(extra, steps, x, y, data.classification, optimizer)
                    run.probed(probes.collect(stepped=False), steps, model, x, bar)
                optimizer.zero_grad(set_to_none=True)
        bar.close()
    return run.result


@dataclass
class Run:
    """The run as the loop sees it: record metrics, notice divergence; `recorded` does the rest."""

    tracker: NullTracker
    result: RunResult
    theory: dict[str, float] = field(default_factory=dict)  # logged next to the probes at step 0
    dynamics: Dynamics = field(default_factory=Dynamics)
    losses: dict[int, float] = field(default_factory=dict)  # since the last probe: logged if it diverges

    def record(self, metrics: dict[str, float], step: int) -> None:
        self.dynamics.add(step, metrics)
        self.tracker.log_metrics(metrics, step)
        self.result.metrics.update(metrics)

    def finite_loss(self, loss: torch.Tensor, step: int, model: MLP, x: torch.Tensor) -> bool:
        """One host sync per step, so divergence is recorded at the step where it starts."""
        value = loss.item()
        if math.isfinite(value):
            self.losses[step] = value
            return True
        for at, earlier in self.losses.items():  # the climb to divergence, visible in the charts
            self.record({Metric.train_loss: earlier}, at)
        self.diverged(step, model, x)
        return False

    def probed(
        self, metrics: dict[str, float], step: int, model: MLP, x: torch.Tensor, bar: Progress
    ) -> bool:
        """Record one probe (at step 0 with the theory's predictions); False if the gradients diverged."""
        self.losses.clear()
        diagnosis = diagnose(metrics)
        bar.fields.update(progress_fields(metrics, diagnosis))
        if step == 0:
            self.result.initial, self.result.diagnosis_init = metrics, diagnosis
            metrics = {**metrics, **self.theory}
        self.record(metrics, step)
        if math.isfinite(metrics[Metric.grad_norm_total]):
            return True
        self.diverged(step, model, x)
        return False

    def gradcheck(
        self,
        every: int,
        step: int,
        model: MLP,
        x: torch.Tensor,
        y: torch.Tensor,
        classification: bool,
        loss: Loss = Loss.auto,
    ) -> None:
        """probes.gradcheck_every: the manual engine's gradients against autograd's, on this batch."""
        if every and step % every == 0:
            self.record({Metric.gradcheck: gradcheck(model, x, y, classification, loss)}, step)

    def instruments(
        self,
        extra: Instruments,
        step: int,
        x: torch.Tensor,
        y: torch.Tensor,
        classification: bool,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        """The Jacobian spectrum and the sharpness where due, on the net before this step's update;
        2/η is that of the update that follows (the schedule has set it)."""
        if extra.jacobian_due(step):
            self.record(extra.jacobian(step), step)
        if extra.sharpness_due(step):
            self.record(extra.sharpness(x, y, classification, optimizer.param_groups[0]["lr"]), step)

    def diverged(self, step: int, model: MLP, x: torch.Tensor) -> None:
        self.result.outcome, self.result.diverged_step = Outcome.diverged, step
        self.result.diverged_layer = first_nonfinite_layer(model, x)


@contextmanager
def recorded(
    cfg: Config,
    tracker: NullTracker,
    out_dir: Path,
    prediction: Prediction | None,
    trained: Run | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[Run]:
    """The run's lifecycle: created RUNNING (SIGTERM from then on ends it KILLED, never RUNNING); after
    the loop the diagnosis; whatever happens, the tags, the artifacts and the final status; on an
    exception also traceback.txt (FAILED) before it propagates.

    `trained`: a run already trained elsewhere (a population's member, bpexp/batched.py), recorded by
    the same lifecycle; its seconds are the population's, and its figure is left to the report."""
    result = trained.result if trained else RunResult(name=run_name(cfg))
    result.out_dir = out_dir
    run = trained or Run(tracker, result, prediction.metrics() if prediction else {})
    start = time.perf_counter()
    with sigterm_as_interrupt():
        try:
            if tracker.run_id is None:  # a population's member was created before its population trained
                tracker.start(*run_start(cfg, result.name, prediction, tags))
            result.tracking_uri = tracker.uri  # the run id comes with finish(): the writer creates the run
            log.debug("run %s started (%s)", result.name, tracker.uri or "not tracked")
            loop_start = time.perf_counter()
            yield run
            tracker.flush()
            result.loop_seconds = result.loop_seconds or time.perf_counter() - loop_start
            ended = result.outcome == Outcome.diverged
            result.diagnosis = Diagnosis.diverged if ended else diagnose(result.metrics)
        except KeyboardInterrupt as interrupt:
            result.outcome = Outcome.killed
            tracker.set_tags({Tag.killed_by: kill_reason(interrupt)})
            raise
        except Exception:
            result.outcome = Outcome.failed
            (out_dir / "traceback.txt").write_text(traceback.format_exc())
            tracker.log_artifact(out_dir / "traceback.txt")
            raise
        finally:
            try:
                finish(cfg, run, figure=trained is None)
            finally:
                result.seconds = result.seconds or time.perf_counter() - start


def run_start(
    cfg: Config, name: str, prediction: Prediction | None, tags: dict[str, str] | None = None
) -> tuple[str, dict[str, Any], dict[str, str]]:
    """What a run is created with (tracker.start): its name, params and opening tags."""
    params = {k: v for k, v in flatten(cfg).items() if not k.startswith("sweep.")}  # sweep.*: how, not what
    params.update(prediction.params() if prediction else {})
    state = {Tag.outcome: Outcome.running, Tag.diagnosis: Diagnosis.pending}
    return name, params, {**state, Tag.config_hash: config_hash(cfg), **(tags or {})}


def name_in_sweep(cfg: Config, overrides: list[str]) -> None:
    """In a sweep the runs differ by what they vary: lead with it (the UI cuts names short)."""
    if cfg.tracking.run_name is None:
        varied = " ".join(o for o in overrides if is_experiment(o))
        cfg.tracking.run_name = f"{varied} · {run_name(cfg)}"[:250] if varied else None


@dataclass
class Pass:
    """One forward and backward pass; delta and activations are filled on probe steps only."""

    loss: torch.Tensor
    out: torch.Tensor  # a^(L), (batch, out_dim)
    delta: list[torch.Tensor]  # δ^(1) … δ^(L)
    activations: list[torch.Tensor]  # f(z^(1)) … f(z^(L-1)) before dropout, then a^(L) = z^(L)
    inputs: list[torch.Tensor] = field(default_factory=list)  # a^(0) … a^(L-1) after dropout (noise)

    def scalars(self, data: Dataset, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch's loss (and accuracy), read by the probes in their one host sync."""
        return {Metric.train_loss: self.loss, **accuracy(data, self.out, y, "train")}


def backprop_pass(
    model: MLP,
    x: torch.Tensor,
    y: torch.Tensor,
    data: Dataset,
    engine: Engine,
    probing: bool,
    loss: Loss = Loss.auto,
    inputs: bool = False,
) -> Pass:
    """Fill every .grad with ∂L/∂θ, by autograd or by the hand-written equations of backprop.py;
    `inputs`: also keep the layer inputs a^(l-1) on probe steps (for the gradient noise)."""
    if engine == Engine.manual:
        manual = manual_backward(model, x, y, data.classification, loss=loss)
        z, out = manual.forward.z, manual.forward.z[-1]
        hidden = [model.f(z_l) for z_l in z[:-1]] if probing else []
        return Pass(manual.loss, out, manual.delta, [*hidden, out], manual.forward.a[:-1])
    if not probing:
        out = model(x)
        value = loss_fn(data, out, y, loss)
        value.backward()  # a non-finite loss gives non-finite grads; the loop stops before they are used
        return Pass(value, out, [], [])
    layer_inputs: list[torch.Tensor] | None = [] if inputs else None
    out, zs, acts = model.trace(x, layer_inputs)  # autograd keeps z^(l) and its gradient δ^(l)
    value = loss_fn(data, out, y, loss)
    value.backward()
    return Pass(value, out, [z.grad for z in zs], [*acts, out.detach()], layer_inputs or [])


def instruments_for(cfg: Config, model: MLP, data: Dataset, loss: Loss) -> Instruments:
    """probes.noise / jacobian_every / sharpness_every for this net; says once why noise is not taken."""
    extra = Instruments(model, cfg.probes, loss, data.x_train, cfg.seed)
    if cfg.probes.enabled and cfg.probes.noise and extra.why_not_noise:
        log.warning("probes.noise: %s", extra.why_not_noise)
    one = cfg.train.batch_size == 1 or len(data.x_train) == 1
    if extra.noise and one and cfg.probes.noise_batch is None:
        raise ConfigError(
            "probes.noise=true needs at least 2 examples per probe, and train.batch_size=1: "
            "set probes.noise_batch to 0 (all training data) or an integer ≥ 2"
        )
    if extra.jacobian_every is not None:
        extra.theory = jacobian_theory(cfg.model, data.in_dim, data.out_dim, data.x_train)
    return extra


def read_noise(probes: Probes, extra: Instruments, step_pass: Pass, data: Dataset) -> None:
    """probes.noise: per-example gradient statistics on the step's batch or on probes.noise_batch's."""
    if not extra.noise:
        return
    picked = extra.noise_examples(data.x_train, data.y_train)
    if picked is None:
        delta, inputs = step_pass.delta, step_pass.inputs
    else:
        delta, inputs = layer_signals(extra.model, *picked, data.classification, extra.loss)
    probes.read_noise(*extra.gradient_noise(delta, inputs))


def finish(cfg: Config, run: Run, figure: bool = True) -> None:
    """Tags, the divergence record, artifacts, then the run's final status: also after a failure."""
    result, tracker = run.result, run.tracker
    try:
        result.run_id, result.ui_url = tracker.run_id, tracker.run_url()  # the recorder's answer
        tags = {Tag.outcome: result.outcome, Tag.diagnosis: result.diagnosis}
        if result.initial:
            tags[Tag.diagnosis_init] = result.diagnosis_init
            tags[Tag.theory] = result.theory_check()
        if result.diverged_step is not None:
            tags[Tag.diverged_step] = str(result.diverged_step)
            tags[Tag.diverged_layer] = str(result.diverged_layer)
            tracker.log_metrics({Metric.diverged_step: result.diverged_step}, result.diverged_step)
        tags[Tag.note] = summary(result)  # the run's Description in the MLflow UI
        tracker.set_tags(tags)
        artifacts = write_artifacts(cfg, result, run.dynamics, figure)  # on disk whatever the outcome
        if result.outcome in (Outcome.completed, Outcome.diverged):
            for path, folder in artifacts:
                tracker.log_artifact(path, folder)
    except Exception as err:  # a run is FINISHED only if all it promised was written
        if result.outcome in (Outcome.completed, Outcome.diverged):
            result.outcome = Outcome.failed
            tracker.set_tags({Tag.outcome: Outcome.failed, Tag.error: f"{type(err).__name__}: {err}"})
        raise
    except KeyboardInterrupt as interrupt:  # SIGTERM (scancel) while the artifacts were being written
        if result.outcome in (Outcome.completed, Outcome.diverged):
            result.outcome = Outcome.killed
            tracker.set_tags({Tag.outcome: Outcome.killed, Tag.killed_by: kill_reason(interrupt)})
        raise
    finally:
        tracker.end(STATUS[result.outcome])


def write_artifacts(
    cfg: Config, result: RunResult, dynamics: Dynamics, figure: bool = True
) -> list[tuple[Path, str | None]]:
    out_dir = result.out_dir
    (out_dir / "plots").mkdir(exist_ok=True)
    config_path = out_dir / "config.yaml"
    config_path.write_text(config_yaml(cfg))
    frame = dynamics.frame()  # built once: for the Parquet file and for the figure
    frame.to_parquet(out_dir / "dynamics.parquet", index=False)
    artifacts = [(config_path, None), (out_dir / "dynamics.parquet", None)]
    if figure and (frame["quantity"] == Quantity.delta_norm).any():
        import matplotlib.pyplot as plt  # here only: 1 s of start-up otherwise

        from bpexp.figures import gradient_profile_figure

        state = diagnosis_change(result.diagnosis_init, result.diagnosis)
        fig = gradient_profile_figure(frame, title=f"{result.name}: {result.outcome}, {state}")
        fig.savefig(out_dir / "plots" / "gradient_profile.png", dpi=110)
        plt.close(fig)
        artifacts.append((out_dir / "plots" / "gradient_profile.png", "plots"))
    return artifacts


def config_yaml(cfg: Config) -> str:
    """OmegaConf.to_yaml of the typed config, word for word, without building an OmegaConf node from
    it (~10 ms a run, which a population pays per member)."""
    import yaml
    from omegaconf._utils import get_omega_conf_dumper

    dumper = get_omega_conf_dumper()
    return yaml.dump(plain(cfg), default_flow_style=False, allow_unicode=True, sort_keys=False, Dumper=dumper)


def resolve_device(device: Device, key: str = "device") -> torch.device:
    """The torch device; `key` names the setting that asked for it in the error."""
    if device == Device.auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == Device.cuda and not torch.cuda.is_available():
        raise ConfigError(f"{key}='cuda' is not allowed here: no CUDA device is visible; use auto or cpu")
    return torch.device(device.value)


def minibatches(
    data: Dataset, batch_size: int | None, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled minibatches, epoch after epoch, from their own generator (init and dropout keep theirs)."""
    for index in minibatch_indices(len(data.x_train), batch_size, [seed], data.x_train.device):
        if index is None:
            yield data.x_train, data.y_train
        else:
            yield data.x_train[index[0]], data.y_train[index[0]]


def minibatch_indices(
    n: int, batch_size: int | None, seeds: list[int], device: torch.device
) -> Iterator[torch.Tensor | None]:
    """Each seed's minibatch rows (len(seeds), batch_size), from a shuffled order per epoch drawn by the
    seed's own generator; None when a batch is the whole training set. A population's members (one seed
    each) get exactly the rows their lone runs get."""
    if batch_size is None or batch_size >= n:
        while True:
            yield None
    generators = [torch.Generator().manual_seed(seed + 1) for seed in seeds]
    while True:
        orders = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)
        for i in range(0, n - batch_size + 1, batch_size):
            yield orders[:, i : i + batch_size]


def loss_fn(data: Dataset, out: torch.Tensor, y: torch.Tensor, loss: Loss = Loss.auto) -> torch.Tensor:
    """train.loss: cross-entropy, or MSE (mean over batch and outputs; one-hot rows for classes)."""
    return loss_value(out, y, data.classification, loss)


def accuracy(data: Dataset, out: torch.Tensor, y: torch.Tensor, split: str) -> dict[str, torch.Tensor]:
    if not data.classification:
        return {}
    return {f"{split}/acc": (out.argmax(1) == y).to(torch.float64).mean()}


@torch.no_grad()
def evaluate(model: MLP, data: Dataset, loss: Loss = Loss.auto) -> dict[str, float]:
    """Validation loss (and accuracy), with dropout off and batch-norm running statistics."""
    if len(data.x_val) == 0:
        return {}
    model.eval()
    out = model(data.x_val)
    model.train()
    metrics = {
        Metric.val_loss: loss_fn(data, out, data.y_val, loss),
        **accuracy(data, out, data.y_val, "val"),
    }
    return {key: float(value) for key, value in metrics.items()}


def run_name(cfg: Config) -> str:
    """<data>-d<depth>w<width>-<activation>-<init>-<optim>-s<seed>, unless tracking.run_name is set."""
    m = cfg.model
    default = (
        f"{cfg.data.name.value}-d{m.depth}w{m.width}-{m.activation.value}-{m.init.value}"
        f"-{cfg.optim.name.value}-s{cfg.seed}"
    )
    return cfg.tracking.run_name or default


def resumed(cfg: Config, launch_dir: Path) -> RunResult | None:
    """sweep.resume=true: this config's FINISHED run, if the store has one (then the job is skipped)."""
    run = make_tracker(cfg.tracking, launch_dir).find_finished(config_hash(cfg))
    if run is None:
        return None
    tags = run.data.tags
    return RunResult(
        name=run.info.run_name or run_name(cfg),
        outcome=Outcome(tags.get(Tag.outcome, Outcome.completed)),
        diagnosis=tags.get(Tag.diagnosis, Diagnosis.unprobed),
        diagnosis_init=tags.get(Tag.diagnosis_init, Diagnosis.unprobed),
        metrics=dict(run.data.metrics),
        run_id=run.info.run_id,
        skipped=True,
    )


CONF = str(Path(__file__).resolve().parents[1] / "conf")  # absolute: the same for every entry point


@hydra.main(version_base="1.3", config_path=CONF, config_name="train")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    launch_dir, out_dir = Path(hydra_cfg.runtime.cwd), Path(hydra_cfg.runtime.output_dir)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    config = None
    try:
        config = to_config(cfg)
        result = resumed(config, launch_dir) if config.sweep.resume else None
        if result is None:
            if sweeping:
                name_in_sweep(config, overrides)
            result = train(config, launch_dir, out_dir, progress=not sweeping)
    except KeyboardInterrupt as err:
        if sweeping:
            raise  # the sweep's hooks end it KILLED and say so
        by = "SIGTERM" if str(err) == f"signal {signal.SIGTERM}" else "Ctrl-C"
        print(f"bpexp: run {run_name(config) if config else ''} killed by {by}", file=sys.stderr)
        sys.exit(143 if by == "SIGTERM" else 130)  # 128 + the signal's number, as the shell reports it
    except (ConfigError, StoreError) as err:
        if sweeping:
            raise  # one bad point of a sweep fails alone; bpexp/sweep.py records it as a FAILED child
        print(f"bpexp: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, ConfigError) else 1)
    if sweeping:
        log.debug(summary(result))  # hydra.verbose=bpexp
        jobs = (sweep_link() or {}).get("jobs")
        print(job_line(result, hydra_cfg.job.num, overrides, jobs), flush=True)
    else:
        print(summary(result))
    return result.objective


def cli() -> None:
    """python -m bpexp.train and bpexp-train: a key the schema lacks fails naming the close ones, where
    Hydra would suggest adding it with '+'; then Hydra composes and runs main."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_known_args()[0]
    groups = {p.name for p in Path(CONF).iterdir() if p.is_dir() and p.name != "hydra"}
    try:
        if not args.shell_completion:
            check_override_keys(args.overrides, groups)
    except ConfigError as err:
        print(f"bpexp: {err}", file=sys.stderr)
        sys.exit(2)
    try:
        main()
    finally:  # the process ends: Python's last collection would walk every object a sweep made (~1.3 s)
        gc.freeze()


if __name__ == "__main__":
    cli()
