"""Pipeline-parallel training on DeepSpeed.

    deepspeed --num_gpus 2 train_pp.py --config configs/ds_config_pp.yml
    python train_pp.py --config configs/ds_config_pp.yml --dry-run     # validate + print the plan
    deepspeed ... train_pp.py --config X --set max_steps=10 --set model_topo.parts=[3,3]

main() -> load_config() -> build() -> train loop over engine.train_batch().
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch

from ppllm.config import Config, ConfigError, load_config


def log0(*args, **kwargs) -> None:
    """Print on global rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config (see configs/ds_config_pp.yml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted for nested keys); repeatable")
    p.add_argument("--dry-run", action="store_true", help="validate config, model and data; print the plan; exit")
    p.add_argument("--plan", action="store_true", help="print per-stage memory (weights, grads, optimizer, "
                   "activations) and a proposed partition; exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar; errors and the final line only")
    p.add_argument("--show-samples", type=int, default=0, metavar="N",
                   help="with the dry run: print N encoded samples with the trained spans marked «…»")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the launcher
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# planning (no process group needed)


def plan(cfg: Config):
    """(family, model args, stage bounds); `parts: auto` uses the memory planner's cost model."""
    from models import load_family
    from models.pipeline import stage_bounds
    from ppllm.planner import propose_bounds
    family, margs = load_family(cfg.run.model_path)
    parts = cfg.run.model_topo.parts
    if parts in (None, "auto"):
        return family, margs, propose_bounds(family, margs, planner_setup(cfg, family, margs))
    return family, margs, stage_bounds(family.num_pipe_layers(margs), cfg.pipe, parts)


def planner_setup(cfg: Config, family=None, margs=None):
    from ppllm.planner import Setup
    zero = cfg.ds.get("zero_optimization") or {}
    opt = (cfg.ds.get("optimizer") or {}).get("type", "adamw")
    return Setup(pipe=cfg.pipe, data=cfg.data, micro_batch=cfg.micro_batch, grad_accum=cfg.grad_accum,
                 seq_len=cfg.run.max_seq_len, precision=resolve_precision(cfg), zero_stage=int(zero.get("stage", 0)),
                 offload_optimizer=(zero.get("offload_optimizer") or {}).get("device") == "cpu",
                 grad_ckpt=cfg.run.use_grad_ckpt, optimizer=opt, flash=cfg.run.use_flash_attn,
                 trainable_fraction=_lora_fraction(cfg, family, margs))


def _lora_fraction(cfg: Config, family, margs) -> float:
    if cfg.run.lora is None or family is None:
        return 1.0
    from ppllm.lora import trainable_fraction
    return trainable_fraction(family, margs, cfg.run.lora)


def memory_plan(cfg: Config) -> int:
    """--plan: per-stage memory for the configured partition, and the partition we propose."""
    from ppllm.planner import estimate, format_plan, parts_from_bounds, propose_bounds
    family, margs, bounds = plan(cfg)
    setup = planner_setup(cfg, family, margs)
    print(format_plan(estimate(family, margs, bounds, setup), setup))
    proposal = propose_bounds(family, margs, setup)
    print(f"configured parts: {parts_from_bounds(bounds)}")
    print(f"proposed parts (balances compute and memory): {parts_from_bounds(proposal)}")
    if proposal != bounds:
        print(format_plan(estimate(family, margs, proposal, setup), setup))
    return 0


def print_plan(cfg: Config, family, margs, bounds) -> None:
    names = family.layer_names(margs)
    counts = family.layer_param_counts(margs)
    print(f"model: {family.name} ({margs.model_type}), {len(names)} pipeline layers, "
          f"{sum(counts) / 1e6:.2f}M parameters")
    print(f"topology: pipe={cfg.pipe} x data={cfg.data} = {cfg.world_size} processes; "
          f"micro batch {cfg.micro_batch} x grad accum {cfg.grad_accum} x data {cfg.data} = "
          f"{cfg.micro_batch * cfg.grad_accum * cfg.data} rows of {cfg.run.max_seq_len} tokens per step")
    for s in range(cfg.pipe):
        lo, hi = bounds[s], bounds[s + 1]
        layer_list = ", ".join(f"{i}:{names[i]}" for i in range(lo, hi))
        if hi - lo > 6:
            layer_list = (f"{lo}:{names[lo]}, {lo + 1}..{hi - 2}: {hi - lo - 2} x {names[lo + 1]}, "
                          f"{hi - 1}:{names[hi - 1]}")
        print(f"  stage {s}: layers {lo}..{hi - 1} ({hi - lo}), "
              f"{sum(counts[lo:hi]) / 1e6:.2f}M params  [{layer_list}]")


def load_data(cfg: Config, model_type: str, files: list[str] | None = None):
    """(tokenizer, packed rows, stats); every sample is validated first (strict: stop on any)."""
    from data.dataset import build_rows, source_weights
    from data.templates import get_template
    from data.tokenizer import load_tokenizer
    tok = load_tokenizer(cfg.tokenizer_path, model_type)
    template = get_template(cfg.run.template, tok, model_type)
    training = files is None or files == cfg.data_files()
    files = cfg.data_files() if files is None else files
    weights = source_weights(cfg.run.data_path, cfg.run.data_weights) if training else None
    rows, stats = build_rows(files, template, cfg.run.max_seq_len, cfg.run.packing, cfg.run.overlong, cfg.run.seed,
                             strict=cfg.run.strict, weights=weights,
                             progress=int(os.environ.get("RANK", "0")) == 0)
    stats.template = template.name
    return tok, rows, stats


def print_data_stats(stats) -> None:
    kinds = ", ".join(f"{k}={v}" for k, v in sorted(stats.samples.items()))
    template = f"template {stats.template}; " if getattr(stats, "template", None) else ""
    print(f"data: {sum(stats.samples.values())} samples ({kinds}) from {len(stats.sources)} file(s); {template}"
          f"{stats.tokens} tokens, {stats.trained_tokens} trained; {stats.truncated} truncated, "
          f"{stats.dropped} dropped; {stats.rows} rows, packing efficiency {stats.efficiency:.1%} "
          f"(one sample per row would be {stats.padded_efficiency:.1%})")
    if stats.skipped:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(stats.skipped.items()))
        print(f"data: skipped {sum(stats.skipped.values())} bad sample(s) (strict: false): {reasons}")


# ----------------------------------------------------------------------------------------
# training


def ds_config(cfg: Config) -> dict:
    """The DeepSpeed dict: the YAML's DeepSpeed keys plus ppllm's precision and defaults."""
    ds = json.loads(json.dumps(cfg.ds))
    ds.setdefault("steps_per_print", 10 ** 9)  # we do our own logging
    ds.setdefault("pipeline", {}).setdefault("use_reentrant", False)
    precision = resolve_precision(cfg)
    if precision == "bf16":
        ds.setdefault("bf16", {"enabled": True})
    elif precision == "fp16":
        ds.setdefault("fp16", {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                               "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1})
    opt = ds.get("optimizer")
    if opt and not torch.cuda.is_available() and opt.get("type", "").lower() in ("adam", "adamw"):
        # DeepSpeed's fused Adam needs CUDA; torch's implementation is used on CPU.
        opt.setdefault("params", {}).setdefault("torch_adam", True)
    return ds


def resolve_precision(cfg: Config) -> str:
    for key in ("bf16", "fp16"):
        if isinstance(cfg.ds.get(key), dict) and cfg.ds[key].get("enabled"):
            return key
    if cfg.run.precision == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return cfg.run.precision


def param_groups(model: torch.nn.Module, no_decay: list[str]) -> list[dict]:
    """Weight decay for matrices; none for biases, norm weights and names matching no_decay."""
    from torch import nn

    from models.common import RMSNorm
    norm_params = {id(p) for m in model.modules() if isinstance(m, (RMSNorm, nn.LayerNorm))
                   for p in m.parameters(recurse=False)}
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in norm_params or any(pat in name for pat in no_decay):
            plain.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


def lr_lambda(sched, total_steps: int):
    """Warmup then cosine (or constant) decay to min_lr_ratio, as a LambdaLR factor."""
    import math
    total = sched.total_steps or total_steps
    warm = sched.warmup_steps if sched.warmup_steps is not None else int(sched.warmup_ratio * total)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if sched.type == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return sched.min_lr_ratio + (1 - sched.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_engine(family, margs, bounds: list[int], pipe: int, data: int, ds_cfg: dict, seed: int,
                 grad_ckpt: bool, model_path: str | None, no_decay: list[str] | None = None,
                 lr_scheduler=None, lora=None):
    """PipelineModule for this rank's stage (weights from model_path, or random) wrapped by DeepSpeed."""
    import deepspeed
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from models.pipeline import PipeModel
    topo = PipeDataParallelTopology(num_pp=pipe, num_dp=data)
    loss_fn = family.loss_fn(margs)
    model = PipeModel(family.build_specs(margs), bounds=bounds, topology=topo, loss_fn=loss_fn,
                      seed_layers=True, base_seed=seed,
                      activation_checkpoint_interval=1 if grad_ckpt else 0,
                      checkpointable_layers=[family.decoder_class.__name__] if grad_ckpt else None)
    if lora is not None:
        from ppllm.lora import apply_lora
        apply_lora(model, lora)
        model.flag_stage_parameters()
    if model_path is not None:
        model.load_layer_files(model_path)
    groups = param_groups(model, no_decay if no_decay is not None else ["bias", "norm"])
    ds_cfg, optimizer = _client_optimizer(ds_cfg, groups)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_cfg, model_parameters=groups,
                                           optimizer=optimizer, lr_scheduler=lr_scheduler)
    _record_grad_norm(engine)
    return engine, loss_fn, topo


def _record_grad_norm(engine) -> None:
    """DeepSpeed reports no gradient norm on its plain fp32 path; measure it just before the step."""
    take_step = engine._take_model_step

    def with_norm(*args, **kwargs):
        plain_fp32 = not (engine.bfloat16_enabled() or engine.fp16_enabled() or engine.zero_optimization())
        if plain_fp32:
            sq = torch.zeros(1, dtype=torch.float64)
            for p in engine.module.parameters():
                if p.grad is not None and not getattr(p, "ds_pipe_replicated", False):
                    sq += p.grad.detach().double().pow(2).sum().cpu()
            sq = sq.to(next(engine.module.parameters()).device)
            torch.distributed.all_reduce(sq, group=engine.grid.get_pipe_parallel_group())
            engine.ppllm_grad_norm = float(sq.sqrt())
        return take_step(*args, **kwargs)

    engine.ppllm_grad_norm = None
    engine._take_model_step = with_norm


def _client_optimizer(ds_cfg: dict, groups: list[dict]):
    """DeepSpeed builds Lion as FusedLion, a CUDA-only op; without CUDA use its CPU Lion instead."""
    opt = ds_cfg.get("optimizer") or {}
    offload = (ds_cfg.get("zero_optimization") or {}).get("offload_optimizer", {}).get("device") == "cpu"
    if opt.get("type", "").lower() != "lion" or torch.cuda.is_available() or offload:
        return ds_cfg, None
    from deepspeed.ops.lion import DeepSpeedCPULion
    ds_cfg = {k: v for k, v in ds_cfg.items() if k != "optimizer"}
    return ds_cfg, DeepSpeedCPULion(groups, **opt.get("params", {}))


def train_step(engine, loss_fn, batches: list | None) -> float:
    """One optimizer step whose loss is the token-weighted mean over every micro-batch and replica.

    The engine averages per-micro-batch losses over grad-accum steps and data-parallel
    replicas; scaling each micro-batch's summed loss by gas * dp / (trained tokens of
    the whole step) turns that average into sum / count.
    """
    from data.dataset import trained_tokens
    if engine.is_last_stage():
        grid = engine.grid
        n_tok = torch.tensor([float(trained_tokens(batches))], dtype=torch.float64)
        torch.distributed.all_reduce(n_tok, group=grid.get_data_parallel_group())
        dp = grid.get_data_parallel_world_size()
        loss_fn.scale = engine.gradient_accumulation_steps() * dp / max(1.0, float(n_tok))
    return float(engine.train_batch(iter(batches) if batches is not None else None))


def evaluate(engine, loss_fn, loader) -> float:
    """Token-weighted loss over the whole eval set, across micro-batches and replicas."""
    from data.dataset import trained_tokens
    loader.load_state_dict({"epoch": 0, "step_in_epoch": 0})
    acc = torch.zeros(2, dtype=torch.float64)
    for _ in range(loader.steps_per_epoch):
        batches = loader.next_step() if loader.has_data else None
        n = float(trained_tokens(batches)) if batches else 0.0
        if engine.is_last_stage():
            loss_fn.scale = engine.gradient_accumulation_steps() / max(1.0, n)
        loss = float(engine.eval_batch(iter(batches) if batches is not None else None))
        if engine.is_first_stage():
            acc += torch.tensor([loss * n, n], dtype=torch.float64)
    torch.distributed.all_reduce(acc)
    return float(acc[0] / max(1.0, float(acc[1])))


class _NoData:
    """Stand-in loader for middle stages: knows the step count, holds no data."""
    has_data = False

    def __init__(self, steps_per_epoch: int):
        self.steps_per_epoch = steps_per_epoch

    def load_state_dict(self, state):
        pass

    def state_dict(self):
        return {}


def make_loader(cfg: Config, files: list[str], model_type: str, has_data: bool, dp_rank: int, dp_size: int,
                announce: bool):
    """StepLoader on data-reading ranks; every rank learns the (minimum) steps per epoch."""
    from data.dataset import StepLoader
    loader = None
    steps = torch.tensor([2 ** 62], dtype=torch.long)
    if has_data:
        _, rows, stats = load_data(cfg, model_type, files)
        if announce:
            print_data_stats(stats)
        loader = StepLoader(rows, cfg.micro_batch, cfg.grad_accum, dp_rank, dp_size, cfg.run.seed)
        loader.has_data = True
        steps[0] = loader.steps_per_epoch
    torch.distributed.all_reduce(steps, op=torch.distributed.ReduceOp.MIN)
    if loader is None:
        loader = _NoData(int(steps))
    loader.steps_per_epoch = int(steps)
    return loader


def train(cfg: Config, quiet: bool = False) -> None:
    import random

    import deepspeed
    import numpy as np
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
    from tqdm import tqdm

    from ppllm import checkpoint as ckpt
    from ppllm.metrics import MetricsWriter, batch_counts, bubble_fraction, device_peak_tflops, flops_per_token

    import datetime

    from ppllm import watchdog
    deepspeed.init_distributed(dist_backend=None, timeout=datetime.timedelta(seconds=cfg.run.dist_timeout))
    dog = watchdog.start(cfg.run.watchdog_timeout)  # a lost rank stops every rank, naming it
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    random.seed(cfg.run.seed)

    from models.common import set_attention_backend
    notice = set_attention_backend(cfg.run.use_flash_attn)
    log0(notice)
    family, margs, bounds = plan(cfg)
    coord = PipeDataParallelTopology(num_pp=cfg.pipe, num_dp=cfg.data).get_coord(rank)
    is_first, is_last = coord.pipe == 0, coord.pipe == cfg.pipe - 1
    reads_data = is_first or is_last
    loader = make_loader(cfg, cfg.data_files(), margs.model_type, reads_data, coord.data, cfg.data, rank == 0)
    eval_loader = None
    if cfg.run.eval_data_path:
        from ppllm.config import expand_data_paths
        eval_loader = make_loader(cfg, expand_data_paths(cfg.run.eval_data_path), margs.model_type, reads_data,
                                  coord.data, cfg.data, False)
    total = loader.steps_per_epoch * cfg.run.n_epoches
    if cfg.run.max_steps:
        total = min(total, cfg.run.max_steps)

    ds = ds_config(cfg)
    scheduler = None
    if "scheduler" not in ds:
        factor = lr_lambda(cfg.run.lr_schedule, total)
        scheduler = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
    engine, loss_fn, topo = build_engine(family, margs, bounds, cfg.pipe, cfg.data, ds, cfg.run.seed,
                                         cfg.run.use_grad_ckpt,
                                         None if cfg.run.from_scratch else cfg.run.model_path,
                                         cfg.run.no_decay, scheduler, cfg.run.lora)
    if cfg.run.lora is not None:
        n_train = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in engine.module.parameters())
        log0(f"lora: r={cfg.run.lora.r} alpha={cfg.run.lora.alpha} on {cfg.run.lora.target_modules}; "
             f"stage 0 trains {n_train} of {n_all} parameters")

    os.makedirs(cfg.run.save_path, exist_ok=True)
    metrics_path = os.path.join(cfg.run.save_path, "metrics.jsonl")
    start = 0
    resume = ckpt.resolve_resume(cfg.run.resume, cfg.run.save_path)
    if resume is not None:
        client = ckpt.load(engine, *resume, strict=cfg.run.lora is None)
        start = int(client.get("step", 0))
        if isinstance(loader, _NoData) is False and client.get("data"):
            loader.load_state_dict(client["data"])
        log0(f"resumed from {os.path.join(*resume)} at step {start}")
        if rank == 0:
            ckpt.truncate_metrics(metrics_path, start)
    elif rank == 0 and os.path.exists(metrics_path):  # keep an earlier run's curve rather than mixing them
        os.replace(metrics_path, f"{metrics_path}.{time.strftime('%Y%m%d-%H%M%S')}")
    torch.distributed.barrier()

    writer = MetricsWriter(cfg.run.save_path, cfg.run.tensorboard) if rank == 0 else None
    fpt = flops_per_token(family, margs, cfg.run.max_seq_len)
    peak = device_peak_tflops(cfg.run.peak_tflops)
    bubble = bubble_fraction(cfg.pipe, cfg.grad_accum)
    partition = {"bounds": bounds, "stage_ranks": [topo.filter_match(pipe=s) for s in range(cfg.pipe)]}
    dp_group = engine.grid.get_data_parallel_group()

    def save(step: int) -> None:
        client = {"step": step, "data": loader.state_dict()}
        ckpt.save(engine, cfg.run.save_path, step, client, cfg.run.model_path, partition, cfg.run.keep_last,
                  cfg.run.lora)

    # a live bar on a terminal; plain log lines every log_interval steps otherwise (CI, files)
    bar = tqdm(total=total, initial=start, desc="train", disable=quiet or rank != 0 or not sys.stderr.isatty(),
               dynamic_ncols=True)
    log0(f"training steps {start + 1}..{total} ({loader.steps_per_epoch} per epoch) on {world} processes, "
         f"precision {resolve_precision(cfg)}")
    for step in range(start + 1, total + 1):
        t0 = time.time()
        batches = loader.next_step() if loader.has_data else None
        loss = train_step(engine, loss_fn, batches)
        counts = batch_counts(batches) if is_first else torch.zeros(3, dtype=torch.float64)
        if is_first:
            torch.distributed.all_reduce(counts, group=dp_group)
        dt = time.time() - t0
        record = None
        if rank == 0:
            lrs = engine.get_lr()
            grad_norm = engine.ppllm_grad_norm if engine.ppllm_grad_norm is not None else engine.get_global_grad_norm()
            tok_s = float(counts[0]) / dt
            record = {"step": step, "loss": loss, "lr": float(lrs[0]) if lrs else 0.0,
                      "grad_norm": float(grad_norm) if grad_norm is not None else None,
                      "tokens": int(counts[0]), "trained_tokens": int(counts[1]), "samples": int(counts[2]),
                      "tokens_per_s": round(tok_s, 2), "samples_per_s": round(float(counts[2]) / dt, 3),
                      "mfu": round(tok_s * fpt / (peak * 1e12 * world), 5) if peak else None,
                      "bubble": round(bubble, 4), "step_time": round(dt, 4)}
        if eval_loader is not None and cfg.run.eval_interval and (step % cfg.run.eval_interval == 0 or step == total):
            eval_loss = evaluate(engine, loss_fn, eval_loader)
            if record is not None:
                record["eval_loss"] = eval_loss
        if rank == 0:
            writer.write(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if not quiet and bar.disable and cfg.run.log_interval and (
                    step % cfg.run.log_interval == 0 or step in (start + 1, total)):
                extra = f" eval_loss {record['eval_loss']:.4f}" if "eval_loss" in record else ""
                print(f"step {step}/{total} loss {loss:.4f}{extra} lr {record['lr']:.3g} "
                      f"{record['tokens_per_s']:.0f} tok/s ({dt:.2f}s/step)", flush=True)
        if cfg.run.save_interval and step % cfg.run.save_interval == 0 and step != total:
            save(step)
    bar.close()
    if start < total or ckpt.read_latest(cfg.run.save_path) is None:
        save(total)
    if writer is not None:
        writer.close()
    watchdog.stop(dog)
    log0(f"done: {total} steps; checkpoint in {cfg.run.save_path} (latest: {ckpt.tag_for(total)})")


def main(argv=None) -> int:
    a = parse_args(argv)
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if launched else None
    try:
        cfg = load_config(a.config, a.set, world_size=None if (a.dry_run or a.plan) else world)
    except ConfigError as e:
        log0(f"error: {e}")
        return 2
    if a.plan:
        return memory_plan(cfg)
    if a.dry_run or a.show_samples:
        return dry_run(cfg, a.show_samples)
    if not launched:
        log0(f"error: start training through the DeepSpeed launcher, e.g. "
             f"`deepspeed --num_gpus {cfg.world_size} train_pp.py --config {a.config}` "
             f"(or use --dry-run to check the config)")
        return 2
    if resolve_precision(cfg) == "fp16" and not torch.cuda.is_available():
        log0("error: precision fp16 needs a CUDA device (DeepSpeed has no fp16 on CPU); "
             "use precision: bf16 or fp32 here")
        return 2
    train(cfg, quiet=a.quiet)
    return 0


def dry_run(cfg: Config, show_samples: int = 0) -> int:
    from data.dataset import DataError
    family, margs, bounds = plan(cfg)
    print(f"config {cfg.source}: OK")
    print_plan(cfg, family, margs, bounds)
    try:
        tok, rows, stats = load_data(cfg, margs.model_type)
    except (DataError, ValueError, FileNotFoundError) as e:  # bad samples, template/tokenizer mismatch
        print(f"error: {e}")
        return 2
    print_data_stats(stats)
    if show_samples:
        from data.preview import show_samples as render_samples
        print(render_samples(rows, tok, show_samples, color=sys.stdout.isatty()))
    per_step = cfg.micro_batch * cfg.grad_accum * cfg.data
    steps = stats.rows // per_step * cfg.run.n_epoches
    if cfg.run.max_steps:
        steps = min(steps, cfg.run.max_steps)
    print(f"would train {steps} optimizer steps; launch with: deepspeed --num_gpus {cfg.world_size} "
          f"train_pp.py --config {cfg.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
