"""The training run: setup, then a loop of step -> log -> eval -> save over ``engine.train_batch``.

``train_pp.py`` parses the command line and calls :func:`main`; everything else is here or one
call away: the engine in ``ppllm.engine``, data in ``ppllm.feed``, checkpoints in
``ppllm.checkpoint``, metrics in ``ppllm.metrics``, the partition in ``ppllm.planner``.
"""
from __future__ import annotations

import datetime
import os
import random
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from ppllm import checkpoint as ckpt
from ppllm import engine as eng
from ppllm import claim, collectives, ds_compat, errors, launch, reshard, watchdog
from ppllm.config import Config, ConfigError, load_config
from ppllm.errors import UserError
from ppllm.feed import count_steps, format_data_stats, format_steps, load_data, load_eval, make_loaders
from ppllm.log import is_rank0, log0
from ppllm.metrics import MetricsWriter, batch_counts, bubble_fraction, device_peak_tflops, flops_per_token
from ppllm.paths import METRICS_FILE, ds_model_states_file, layer_file, step_of, tag_for
from ppllm.planner import format_layout, loss_chunk_bytes, memory_plan, resolve_partition


@dataclass
class Run:
    """Everything the loop needs, built once by :func:`setup`."""
    cfg: Config
    engine: object
    family: object
    margs: object
    bounds: list
    partition: dict
    loader: object
    eval_loader: object | None
    total: int
    start: int
    rank: int
    world: int
    is_first: bool


def init_process_group(cfg: Config, le: launch.LaunchEnv) -> str:
    """Bind this rank's device, then start the process group (NCCL on GPUs, gloo on CPU); the device."""
    import deepspeed
    launch.export(le)
    device = launch.bind_device(le)
    deepspeed.init_distributed(dist_backend=None, timeout=datetime.timedelta(seconds=cfg.run.dist_timeout))
    return device


def setup(cfg: Config) -> Run:
    """Seeds, partition, data, engine, resume (the process group is up)."""
    from models.common import attention_backend
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    attention, notice = attention_backend(cfg.run.use_flash_attn, cfg.run.attention)
    log0(notice)

    family, margs, bounds = resolve_partition(cfg)
    topo = ds_compat.topology(cfg.pipe, cfg.data)
    coord = topo.get_coord(rank)
    is_first, is_last = coord.pipe == 0, coord.pipe == cfg.pipe - 1
    reads_data = is_first or is_last
    loader, eval_loader, total = make_loaders(cfg, margs.model_type, reads_data, coord.data, cfg.data, rank == 0)

    ds = eng.ds_config(cfg)
    scheduler = None
    if "scheduler" not in ds:
        factor = eng.lr_lambda(cfg.run.lr_schedule, total)
        scheduler = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
    engine, _, _ = eng.build_engine(family, margs, bounds, cfg.pipe, cfg.data, ds, cfg.run.seed,
                                    cfg.run.use_grad_ckpt, None if cfg.run.from_scratch else cfg.run.model_path,
                                    cfg.run.no_decay, scheduler, cfg.run.lora, attention,
                                    loss_chunk_bytes(cfg), cfg.run.schedule)
    if cfg.run.lora is not None:
        n_train = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in engine.module.parameters())
        log0(f"lora: r={cfg.run.lora.r} alpha={cfg.run.lora.alpha} on {cfg.run.lora.target_modules}; "
             f"stage 0 trains {n_train} of {n_all} parameters")
    partition = run_record(cfg, bounds)
    start = resume(cfg, engine, loader, rank, partition)
    return Run(cfg, engine, family, margs, bounds, partition, loader, eval_loader, total, start, rank, world,
               is_first)


def run_record(cfg: Config, bounds: list[int]) -> dict:
    topo = ds_compat.topology(cfg.pipe, cfg.data)
    return reshard.run_record(cfg, bounds, [topo.filter_match(pipe=s) for s in range(cfg.pipe)])


def check_resume(cfg: Config) -> str | None:
    """Before launch: can the checkpoint ``resume`` names be continued under this config? A line to
    print, or None for a fresh run; raises reshard.ResumeError with the reason and the way out."""
    found = ckpt.resolve_resume(cfg.run.resume, cfg.run.save_path)
    if found is None:
        return None
    _, _, bounds = resolve_partition(cfg)
    return reshard.describe_plan(os.path.join(*found), run_record(cfg, bounds))


def resume(cfg: Config, engine, loader, rank: int, record: dict) -> int:
    """Load the checkpoint ``resume`` names (weights, optimizer, scheduler, data position, RNG), resharded
    when it was written under another topology; returns the step to continue after (0 for a fresh run)."""
    os.makedirs(cfg.run.save_path, exist_ok=True)
    metrics_path = os.path.join(cfg.run.save_path, METRICS_FILE)
    start = 0
    found = ckpt.resolve_resume(cfg.run.resume, cfg.run.save_path)
    if found is not None:
        tag_dir = os.path.join(*found)
        how = reshard.plan(tag_dir, record)
        index, count = ckpt.node_place()
        needed = [] if cfg.run.lora is not None else [
            os.path.basename(layer_file(tag_dir, i)) for i, _ in engine.module.local_layers()]
        if how == "same":
            needed.append(os.path.basename(ds_model_states_file(tag_dir, engine.stage_id)))
        spent = errors.agree(lambda: ckpt.verify(tag_dir, needed, index, count))  # before anything is opened
        log0(f"checkpoint {tag_dir}: verified in {spent:.1f} s" + (
            "" if ckpt.read_manifest(tag_dir) is not None else " (no manifest: written before ppllm recorded one; "
            "files checked for presence and safe unpickling only)"))
        client = ckpt.load(engine, *found, strict=cfg.run.lora is None, reshard=how == "reshard")
        start = int(client.get("step", 0))
        if client.get("data"):
            loader.load_state_dict(client["data"])
        log0(f"resumed from {os.path.join(*found)} at step {start}" + (" (resharded)" if how == "reshard" else ""))
        if rank == 0:
            ckpt.truncate_metrics(metrics_path, start)
    elif rank == 0 and os.path.exists(metrics_path):  # keep an earlier run's curve rather than mixing them
        os.replace(metrics_path, f"{metrics_path}.{time.strftime('%Y%m%d-%H%M%S')}")
    collectives.barrier()
    return start


def evaluate(engine, loader) -> float:
    """Token-weighted loss over the whole eval set (every row once), across micro-batches and replicas."""
    loss_sum, n = 0.0, 0.0
    for batches in loader.one_pass():
        step_loss, step_n = eng.eval_step(engine, batches)
        if engine.is_first_stage():
            loss_sum, n = loss_sum + step_loss, n + step_n
    loss_sum, n = collectives.all_reduce([loss_sum, n])
    return loss_sum / max(1.0, n)


class StepLog:
    """Per-step metrics (rank 0): metrics.jsonl/tensorboard, the progress bar or plain log lines."""

    def __init__(self, run: Run, quiet: bool):
        from tqdm import tqdm
        cfg = run.cfg
        self.run, self.quiet = run, quiet
        self.rank0 = run.rank == 0
        self.writer = MetricsWriter(cfg.run.save_path, cfg.run.tensorboard) if self.rank0 else None
        self.fpt = flops_per_token(run.family, run.margs, cfg.run.max_seq_len)
        self.peak = device_peak_tflops(cfg.run.peak_tflops)
        self.bubble = bubble_fraction(cfg.pipe, cfg.grad_accum, cfg.run.schedule)
        # a live bar on a terminal; plain log lines every log_interval steps otherwise (CI, files)
        self.bar = tqdm(total=run.total, initial=run.start, desc="train", dynamic_ncols=True,
                        disable=quiet or not self.rank0 or not sys.stderr.isatty())

    def record(self, step: int, loss: float, batches, dt: float) -> dict | None:
        """Collective over the first stage's data-parallel group (token counts); the record on rank 0."""
        engine = self.run.engine
        counts = [0.0, 0.0, 0.0]
        if self.run.is_first:
            counts = collectives.all_reduce(batch_counts(batches), group=engine.grid.get_data_parallel_group())
        if not self.rank0:
            return None
        lrs = engine.get_lr()
        tok_s = float(counts[0]) / dt
        return {"step": step, "loss": loss, "lr": float(lrs[0]) if lrs else 0.0, "grad_norm": eng.grad_norm(engine),
                "tokens": int(counts[0]), "trained_tokens": int(counts[1]), "samples": int(counts[2]),
                "tokens_per_s": round(tok_s, 2), "samples_per_s": round(float(counts[2]) / dt, 3),
                "mfu": round(tok_s * self.fpt / (self.peak * 1e12 * self.run.world), 5) if self.peak else None,
                "bubble": round(self.bubble, 4), "step_time": round(dt, 4)}

    def write(self, record: dict | None) -> None:
        if record is None:
            return
        self.writer.write(record)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}")
        step, log_every = record["step"], self.run.cfg.run.log_interval
        if not self.quiet and self.bar.disable and log_every and (
                step % log_every == 0 or step in (self.run.start + 1, self.run.total)):
            extra = f" eval_loss {record['eval_loss']:.4f}" if "eval_loss" in record else ""
            print(f"step {step}/{self.run.total} loss {record['loss']:.4f}{extra} lr {record['lr']:.3g} "
                  f"{record['tokens_per_s']:.0f} tok/s ({record['step_time']:.2f}s/step)", flush=True)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def save(run: Run, step: int) -> None:
    cfg = run.cfg
    client = {"step": step, "data": run.loader.state_dict()}
    ckpt.save(run.engine, cfg.run.save_path, step, client, cfg.run.model_path, run.partition, cfg.run.keep_last,
              cfg.run.lora)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT to every rank) or the launcher's SIGTERM that follows it."""


def _on_signal(signum, frame):
    # the first signal stops the loop; the launcher's SIGTERM right after Ctrl-C must not kill the
    # rank before it has said where the run will resume. (A no-op handler, not SIG_IGN: a signal
    # already pending when the handler changes to SIG_IGN surfaces as an OSError.)
    signal.signal(signal.SIGINT, _swallow)
    signal.signal(signal.SIGTERM, _swallow)
    raise Interrupted(signum)


def _swallow(signum, frame):
    pass


def interrupted_message(save_path: str, step: int) -> str:
    tag = ckpt.read_latest(save_path)
    if tag is None:
        return (f"interrupted at step {step}, before the first checkpoint: nothing to resume from, a new run starts "
                f"at step 1 (save_interval saves more often)")
    return (f"interrupted at step {step}: run the same command to resume from {os.path.join(save_path, tag)} "
            f"(step {step_of(tag)})")


def nothing_to_train(cfg: Config, start: int, total: int) -> str:
    limit = f"max_steps {cfg.run.max_steps}" if cfg.run.max_steps == total else f"{cfg.run.n_epoches} pass(es)"
    return (f"nothing to train: {cfg.run.save_path} already holds step {start}, and this run ends at step {total} "
            f"({limit}); raise max_steps or n_epoches to train further, or use resume: never or another "
            f"save_path to start over")


def train(cfg: Config, le: launch.LaunchEnv, quiet: bool = False) -> None:
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    step = 0
    dog = held = None
    try:
        device = init_process_group(cfg, le)
        log0(f"launched by {le.launcher}: {le.world_size} processes, rank 0 on {device}")
        dog = watchdog.start(cfg.run.watchdog_timeout)  # a lost rank stops every rank, naming it
        try:
            held = claim_save_path(cfg)
            run = setup(cfg)
        except UserError:  # every rank agreed on it (ppllm.errors.agree): stop cleanly, main prints it
            watchdog.stop(dog)
            raise
        step = run.start
        if run.start >= run.total:
            log0(nothing_to_train(cfg, run.start, run.total))
            watchdog.stop(dog)
            return
        for step in loop(run, quiet):
            pass
        watchdog.stop(dog)
    except Interrupted as stop:
        watchdog.mark_stopping(dog)  # a peer that sees this process gone knows it was stopped, not lost
        # SIGTERM (not Ctrl-C): maybe the launcher stopping the survivors of a rank that died: name that rank
        lost = watchdog.lost_ranks_line(dog) if stop.args and stop.args[0] == signal.SIGTERM else None
        if held is not None:
            held.release()
        if lost:
            watchdog.say(lost)
        elif is_rank0():
            print(interrupted_message(cfg.run.save_path, step), flush=True)
        sys.stdout.flush()
        ds_compat.release_shm_buffer()
        os._exit(watchdog.EXIT_CODE if lost else 130)  # no teardown: a collective now would only hang
    finally:
        if held is not None:
            held.release()
        ds_compat.release_shm_buffer()
    log0(f"done: {run.total} steps; checkpoint in {cfg.run.save_path} (latest: {tag_for(run.total)})")


def claim_save_path(cfg: Config) -> claim.Claim | None:
    """Rank 0 claims save_path for this run (ppllm.claim); every rank learns whether a live run holds it."""
    import socket
    run_id = collectives.broadcast_object(f"{socket.gethostname()}-{os.getpid()}-{time.time()}", src=0)
    held = errors.agree(lambda: claim.Claim(cfg.run.save_path, run_id) if torch.distributed.get_rank() == 0
                        else None)
    if held is not None and held.note:
        log0(held.note)
    return held


def loop(run: Run, quiet: bool):
    """Step -> log -> eval -> save; yields each step once trained (so the caller knows where it stopped)."""
    cfg = run.cfg
    log = StepLog(run, quiet)
    every_eval, every_save = cfg.run.eval_interval, cfg.run.save_interval
    log0(f"training steps {run.start + 1}..{run.total} ({run.loader.steps_per_epoch} per epoch) on {run.world} "
         f"processes; {eng.precision_route(cfg).describe()}")
    for step in range(run.start + 1, run.total + 1):
        t0 = time.time()
        batches = run.loader.next_step()
        loss = eng.train_step(run.engine, batches)
        yield step
        record = log.record(step, loss, batches, time.time() - t0)
        if run.eval_loader is not None and every_eval and (step % every_eval == 0 or step == run.total):
            eval_loss = evaluate(run.engine, run.eval_loader)
            if record is not None:
                record["eval_loss"] = eval_loss
        log.write(record)
        if every_save and step % every_save == 0 and step != run.total:
            save(run, step)
    log.close()
    save(run, run.total)


def dry_run(cfg: Config, show_samples: int = 0) -> int:
    """The launch's twin for data: the same loading, checks and messages, then the counts.
    It also writes the data cache, so a corpus can be prepared ahead of a run (login node)."""
    family, margs, bounds = resolve_partition(cfg)
    print(f"config {cfg.source}: OK")
    print(format_layout(cfg, family, margs, bounds))
    try:
        note = check_resume(cfg)
    except UserError as e:  # a topology that cannot reshard, a damaged latest, a missing checkpoint
        print(f"error: {e}")
        return 2
    if note:
        print(note)
    print(eng.precision_route(cfg).describe() + f" (on {eng.accelerator()} here)")
    problem = device_problem(cfg)
    if problem:
        print(f"note: {problem}; the launch refuses it here")
    holder = claim.in_use(cfg.run.save_path)
    if holder:
        print(f"note: save_path {cfg.run.save_path} is in use by another run: {holder}; a launch now is refused")
    try:
        tok, rows, stats = load_data(cfg, margs.model_type)
        eval_rows, eval_stats = load_eval(cfg, margs.model_type)
    except UserError as e:
        print(f"error: {e}")
        return 2
    print(format_data_stats(stats))
    if eval_stats is not None:
        print(format_data_stats(eval_stats, "eval data"))
    if show_samples:
        from data.preview import show_samples as render_samples
        print(render_samples(rows, tok, show_samples, color=sys.stdout.isatty()))
    total, _ = count_steps(cfg, stats.rows, eval_stats.rows if eval_stats is not None else None)
    found = ckpt.resolve_resume(cfg.run.resume, cfg.run.save_path)
    start = (step_of(found[1]) or 0) if found else 0
    if found and start >= total:
        print(nothing_to_train(cfg, start, total))
        return 0
    print(format_steps(cfg, stats.rows, eval_stats.rows if eval_stats is not None else None, start))
    print(f"launch with: deepspeed --num_gpus {cfg.world_size} train_pp.py --config {cfg.source}")
    return 0


def device_problem(cfg: Config) -> str | None:
    """A precision this machine's accelerator cannot train in, as a line naming the fix."""
    precision, acc = eng.resolve_precision(cfg), eng.accelerator()
    if precision == "fp16" and acc == "cpu":
        return "precision fp16 needs a GPU (DeepSpeed has no fp16 on CPU); use precision: bf16 or fp32 here"
    if precision == "bf16":
        from deepspeed.accelerator import get_accelerator
        if not get_accelerator().is_bf16_supported():
            return (f"precision bf16 is not supported by this {acc} device ({get_accelerator().device_name()}); "
                    f"use precision: fp16 (or fp32)")
    return None


def main(config: str, overrides: list[str], dry: bool = False, plan: bool = False, quiet: bool = False,
         show_samples: int = 0) -> int:
    """What ``train_pp.py`` runs: the dry run, the memory plan, or training under the launcher."""
    try:
        le = launch.read()
    except launch.LaunchError as e:
        log0(f"error: {e}")
        return 2
    launched = le is not None
    world = le.world_size if launched else None
    try:
        cfg = load_config(config, overrides, world_size=None if (dry or plan) else world)
    except ConfigError as e:
        log0(f"error: {e}")
        return 2
    if plan:
        print(memory_plan(cfg))
        return 0
    if dry or show_samples:
        return dry_run(cfg, show_samples)
    if not launched:
        log0(f"error: start training through a launcher, e.g. "
             f"`deepspeed --num_gpus {cfg.world_size} train_pp.py --config {config}` or `torchrun "
             f"--nproc-per-node {cfg.world_size} train_pp.py --config {config}` (srun and mpirun work too; see "
             f"README, Launching), or use --dry-run to check the config")
        return 2
    problem = device_problem(cfg)
    if problem:
        log0(f"error: {problem}")
        return 2
    try:
        note = check_resume(cfg)
        if note:
            log0(note)
        train(cfg, le, quiet=quiet)
    except UserError as e:  # config, resume, data, checkpoint: agreed by every rank (ppllm.errors.agree)
        log0(f"error: {e}")  # one line, from rank 0, and a non-zero exit
        return 2
    return 0
