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
    p.add_argument("--quiet", action="store_true", help="no progress bar; errors and the final line only")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the launcher
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------
# planning (no process group needed)


def plan(cfg: Config):
    from models import load_family
    from models.pipeline import layer_costs, stage_bounds
    family, margs = load_family(cfg.run.model_path)
    n = family.num_pipe_layers(margs)
    parts = cfg.run.model_topo.parts
    costs = layer_costs(family, margs)
    bounds = stage_bounds(n, cfg.pipe, None if parts in (None, "auto") else parts, costs)
    return family, margs, bounds


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


def load_data(cfg: Config, model_type: str):
    from data.dataset import build_rows
    from data.templates import get_template
    from data.tokenizer import load_tokenizer
    tok = load_tokenizer(cfg.tokenizer_path)
    template = get_template(cfg.run.template, tok, model_type)
    rows, stats = build_rows(cfg.data_files(), template, cfg.run.max_seq_len, cfg.run.packing,
                             cfg.run.overlong, cfg.run.seed)
    return tok, rows, stats


def print_data_stats(stats) -> None:
    kinds = ", ".join(f"{k}={v}" for k, v in sorted(stats.samples.items()))
    print(f"data: {sum(stats.samples.values())} samples ({kinds}); {stats.tokens} tokens, "
          f"{stats.trained_tokens} trained; {stats.truncated} truncated, {stats.dropped} dropped; "
          f"{stats.rows} rows, packing efficiency {stats.efficiency:.1%}")


# ----------------------------------------------------------------------------------------
# training


def ds_config(cfg: Config) -> dict:
    ds = json.loads(json.dumps(cfg.ds))
    ds.setdefault("steps_per_print", 10 ** 9)  # we do our own logging
    pipe = ds.setdefault("pipeline", {})
    pipe.setdefault("use_reentrant", False)
    opt = ds.get("optimizer")
    if opt and not torch.cuda.is_available() and opt.get("type", "").lower() in ("adam", "adamw"):
        # DeepSpeed's fused Adam needs CUDA; torch's implementation is used on CPU.
        opt.setdefault("params", {}).setdefault("torch_adam", True)
    return ds


def build_engine(family, margs, bounds: list[int], pipe: int, data: int, ds_cfg: dict, seed: int,
                 grad_ckpt: bool, model_path: str | None):
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
    if model_path is not None:
        model.load_layer_files(model_path)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_cfg, model_parameters=params)
    return engine, loss_fn, topo


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


def train(cfg: Config, quiet: bool = False) -> None:
    import deepspeed
    from tqdm import tqdm

    from data.dataset import StepLoader

    deepspeed.init_distributed(dist_backend=None)
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    torch.manual_seed(cfg.run.seed)

    family, margs, bounds = plan(cfg)
    engine, loss_fn, topo = build_engine(family, margs, bounds, cfg.pipe, cfg.data, ds_config(cfg), cfg.run.seed,
                                         cfg.run.use_grad_ckpt,
                                         None if cfg.run.from_scratch else cfg.run.model_path)

    is_first, is_last = engine.is_first_stage(), engine.is_last_stage()
    grid = engine.grid
    dp_rank, dp_size = grid.get_data_parallel_rank(), grid.get_data_parallel_world_size()

    loader = None
    steps_per_epoch = torch.tensor([2 ** 62], dtype=torch.long)
    if is_first or is_last:
        _, rows, stats = load_data(cfg, margs.model_type)
        if rank == 0:
            print_data_stats(stats)
        loader = StepLoader(rows, cfg.micro_batch, cfg.grad_accum, dp_rank, dp_size, cfg.run.seed)
        steps_per_epoch[0] = loader.steps_per_epoch
    torch.distributed.all_reduce(steps_per_epoch, op=torch.distributed.ReduceOp.MIN)
    total = int(steps_per_epoch) * cfg.run.n_epoches
    if cfg.run.max_steps:
        total = min(total, cfg.run.max_steps)

    os.makedirs(cfg.run.save_path, exist_ok=True)
    metrics_path = os.path.join(cfg.run.save_path, "metrics.jsonl")
    if rank == 0 and os.path.exists(metrics_path):  # keep an earlier run's curve rather than mixing or losing it
        os.replace(metrics_path, f"{metrics_path}.{time.strftime('%Y%m%d-%H%M%S')}")
    # a live bar on a terminal; plain log lines every log_interval steps otherwise (CI, files)
    bar = tqdm(total=total, desc="train", disable=quiet or rank != 0 or not sys.stderr.isatty(),
               dynamic_ncols=True)
    log0(f"training {total} steps ({int(steps_per_epoch)} per epoch) on {world} processes")

    for step in range(1, total + 1):
        t0 = time.time()
        batches = loader.next_step() if loader is not None else None
        loss = train_step(engine, loss_fn, batches)
        dt = time.time() - t0
        if rank == 0:
            lrs = engine.get_lr()
            rec = {"step": step, "loss": loss, "lr": float(lrs[0]) if lrs else 0.0, "step_time": round(dt, 4)}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if not quiet and bar.disable and cfg.run.log_interval and (
                    step % cfg.run.log_interval == 0 or step in (1, total)):
                print(f"step {step}/{total} loss {loss:.4f} lr {rec['lr']:.3g} "
                      f"({dt:.2f}s/step)", flush=True)
        if cfg.run.save_interval and step % cfg.run.save_interval == 0 and step != total:
            save(engine, cfg, step, bounds, topo)
    bar.close()
    save(engine, cfg, total, bounds, topo)
    log0(f"done: {total} steps; checkpoint in {cfg.run.save_path} (latest: global_step{total})")


def save(engine, cfg: Config, step: int, bounds: list[int], topo) -> None:
    tag = f"global_step{step}"
    engine.save_checkpoint(cfg.run.save_path, tag=tag)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        from convert_model import _copy_side_files
        tag_dir = os.path.join(cfg.run.save_path, tag)
        _copy_side_files(cfg.run.model_path, tag_dir)
        meta = os.path.join(cfg.run.model_path, "ppllm.json")
        if os.path.isfile(meta):
            shutil.copy2(meta, tag_dir)
        ranks = [topo.filter_match(pipe=s) for s in range(cfg.pipe)]
        with open(os.path.join(tag_dir, "ppllm_partition.json"), "w") as f:
            json.dump({"bounds": bounds, "stage_ranks": ranks}, f)
    torch.distributed.barrier()


def main(argv=None) -> int:
    a = parse_args(argv)
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if launched else None
    try:
        cfg = load_config(a.config, a.set, world_size=None if a.dry_run else world)
    except ConfigError as e:
        log0(f"error: {e}")
        return 2
    if a.dry_run:
        return dry_run(cfg)
    if not launched:
        log0(f"error: start training through the DeepSpeed launcher, e.g. "
             f"`deepspeed --num_gpus {cfg.world_size} train_pp.py --config {a.config}` "
             f"(or use --dry-run to check the config)")
        return 2
    train(cfg, quiet=a.quiet)
    return 0


def dry_run(cfg: Config) -> int:
    from data.dataset import DataError
    family, margs, bounds = plan(cfg)
    print(f"config {cfg.source}: OK")
    print_plan(cfg, family, margs, bounds)
    try:
        _, rows, stats = load_data(cfg, margs.model_type)
    except DataError as e:
        print(f"error: {e}")
        return 2
    print_data_stats(stats)
    per_step = cfg.micro_batch * cfg.grad_accum * cfg.data
    steps = stats.rows // per_step * cfg.run.n_epoches
    if cfg.run.max_steps:
        steps = min(steps, cfg.run.max_steps)
    print(f"would train {steps} optimizer steps; launch with: deepspeed --num_gpus {cfg.world_size} "
          f"train_pp.py --config {cfg.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
