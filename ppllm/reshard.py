"""Resuming a checkpoint under another pipeline/data topology (``dims`` or ``parts`` changed).

Layer files do not depend on the topology. DeepSpeed's own per-stage files
(``mp_rank_XX_model_states.pt``: optimizer, scheduler, counters, client state) do: its optimizer
state is a list in the order of that stage's parameters. Every save therefore also writes, per
stage, the names of the optimizer's parameters in that order (``ppllm_params-stageXX.json``), so
a resume under another topology can hand each parameter its own Adam moments and step count:

* weights from the layer files, tied copies re-synchronised;
* optimizer state matched by parameter name (``<layer index>.<name>``; a tied copy is named after
  the layer that owns it), learning rate from the saved groups;
* scheduler state, step counters, the data position and the client state from stage 0's file;
* RNG from the same global rank where it existed (the families have no dropout, so the loss
  curve does not depend on it).

bf16 runs (DeepSpeed's bf16 optimizer under ZeRO-1, ppllm's default on GPUs) keep the fp32 master
weights and Adam moments in flat buffers, a slice per data-parallel rank, in
``bf16_zero_pp_rank_D_mp_rank_SS_optim_states.pt``; each file also says where every parameter's part
of its slice is, so a resume gathers each parameter whole by name and hands every new rank its new
slice (``ds_compat.read_bf16_state`` / ``load_bf16_state``).

Refused before launch, with the weights-only route: fp32 under ZeRO, CPU offload, fp16, a change of
precision, LoRA adapter checkpoints, another optimizer type, and a different number of rows per step
(the data position would not carry).
"""
from __future__ import annotations

import json
import os


from ppllm import ds_compat
from ppllm.errors import UserError
from ppllm.paths import PARTITION_FILE, ds_model_states_file, param_index_file


class ResumeError(UserError):
    """A checkpoint that this config cannot continue from; the message says why and what to do."""


def run_record(cfg, bounds: list[int], stage_ranks: list[list[int]]) -> dict:
    """What a save records about the run's topology and optimizer (ppllm_partition.json)."""
    from ppllm.engine import precision_route
    zero = cfg.ds.get("zero_optimization") or {}
    route = precision_route(cfg)
    return {"bounds": list(bounds), "stage_ranks": stage_ranks, "dims": [cfg.pipe, cfg.data],
            "rows_per_step": cfg.micro_batch * cfg.grad_accum * cfg.data,
            "zero_stage": route.zero_stage, "grad_accum_dtype": route.grad_accum_dtype,
            "offload": (zero.get("offload_optimizer") or {}).get("device") == "cpu",
            "precision": route.precision, "lora": cfg.run.lora is not None,
            "optimizer": ((cfg.ds.get("optimizer") or {}).get("type") or "").lower()}


def read_record(tag_dir: str) -> dict | None:
    path = os.path.join(tag_dir, PARTITION_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _describe(rec: dict) -> str:
    parts = [rec["bounds"][i + 1] - rec["bounds"][i] for i in range(len(rec["bounds"]) - 1)]
    dims = rec.get("dims") or [len(parts), "?"]
    return f"pipe={dims[0]} x data={dims[1]}, parts {parts}"


def plan(tag_dir: str, new: dict) -> str:
    """'same' or 'reshard' for resuming ``tag_dir`` with the run described by ``new``
    (a :func:`run_record`); raises ResumeError with a one-line reason and the way out."""
    old = read_record(tag_dir)
    if old is None or (old["bounds"] == new["bounds"] and old.get("dims", new["dims"]) == new["dims"]):
        return "same"
    route = (f"to start from its weights alone, set model_path: {tag_dir} and resume: never (optimizer, "
             f"schedule and data position start fresh), or resume with the topology it was written with "
             f"({_describe(old)})")
    why = None
    if "dims" not in old:
        why = "it was written before ppllm recorded optimizer parameter names"
    elif old["lora"] or new["lora"]:
        why = "LoRA adapter checkpoints are resumed only with the topology they were written with"
        route = f"resume with {_describe(old)}"
    elif old["offload"] or new["offload"]:
        why = "CPU offload keeps the optimizer state in DeepSpeed's flat ZeRO buffers"
    elif old["precision"] != new["precision"]:
        why = f"the precision changed ({old['precision']} -> {new['precision']})"
    elif old["precision"] == "fp16":
        why = "fp16 training keeps DeepSpeed's flat mixed-precision state"
    elif old["precision"] == "fp32" and (old["zero_stage"] or new["zero_stage"]):
        why = "ZeRO partitions the fp32 optimizer state into flat per-rank buffers"
    elif old["optimizer"] != new["optimizer"]:
        why = f"the optimizer changed ({old['optimizer'] or 'none'} -> {new['optimizer'] or 'none'})"
    elif old["rows_per_step"] != new["rows_per_step"]:
        why = (f"a step held {old['rows_per_step']} rows and would now hold {new['rows_per_step']} rows "
               f"(micro batch x gradient_accumulation_steps x data), so the data position does not carry over")
        route = ("keep micro batch x gradient_accumulation_steps x data equal to "
                 f"{old['rows_per_step']}, or " + route)
    if why:
        raise ResumeError(f"resume: {tag_dir} was written with {_describe(old)} and cannot be resharded to "
                          f"{_describe(new)}: {why}; {route}")
    return "reshard"


def describe_plan(tag_dir: str, new: dict) -> str:
    kind = plan(tag_dir, new)
    if kind == "same":
        return f"resume: from {tag_dir}"
    return (f"resume: from {tag_dir}, resharded from {_describe(read_record(tag_dir))} to {_describe(new)} "
            f"(weights, optimizer state, schedule, data position)")


# ---------------------------------------------------------------------------------------------
# save and load


def param_names(module) -> dict[int, str]:
    """id(parameter) -> '<layer index>.<name>' for this stage; tied copies take the owner's index."""
    names = {}
    for index, layer in module.local_layers():
        for name, p in layer.named_parameters():
            names[id(p)] = f"{index}.{name}"
    for _, tied, attrs, owners in module.tied_groups():
        for attr in attrs:
            names[id(getattr(tied, attr))] = f"{owners[0]}.{attr}"
    return names


def write_param_index(engine, tag_dir: str) -> None:
    """This stage's optimizer parameters by name, in the optimizer's order (data-parallel rank 0)."""
    names = param_names(engine.module)
    order = [names[id(p)] for group in ds_compat.client_optimizer(engine).param_groups for p in group["params"]]
    with open(param_index_file(tag_dir, engine.stage_id), "w") as f:
        json.dump(order, f)


def load_resharded(engine, tag_dir: str, model_path_loaded: bool = True) -> dict:
    """Load a checkpoint written under another topology into this rank's engine; returns the client state."""
    record = read_record(tag_dir)
    old_stages = len(record["bounds"]) - 1
    engine.module.load_layer_files(tag_dir)
    if record["precision"] == "bf16":
        return _load_resharded_bf16(engine, tag_dir, record)
    by_name: dict[str, dict] = {}
    lr = None
    first = None
    for s in range(old_stages):
        sd = ds_compat.safe_load_or_refuse(ds_model_states_file(tag_dir, s))
        with open(param_index_file(tag_dir, s)) as f:
            order = json.load(f)
        opt = sd["optimizer"]
        for i, name in enumerate(order):
            if i in opt["state"]:
                by_name.setdefault(name, opt["state"][i])
        lr = lr if lr is not None else opt["param_groups"][0]["lr"]
        first = first if first is not None else sd
    optimizer = ds_compat.client_optimizer(engine)
    names = param_names(engine.module)
    new_sd = optimizer.state_dict()
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    new_sd["state"] = {i: by_name[names[id(p)]] for i, p in enumerate(flat) if names[id(p)] in by_name}
    for group in new_sd["param_groups"]:
        group["lr"] = lr
    optimizer.load_state_dict(new_sd)
    if engine.lr_scheduler is not None and first.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(first["lr_scheduler"])
    ds_compat.restore_counters(engine, first)
    return {k: first[k] for k in ("step", "data") if k in first}


def _load_resharded_bf16(engine, tag_dir: str, record: dict) -> dict:
    """The bf16 optimizer's master weights and moments, gathered by name from every old stage and
    data-parallel slice, then split into this rank's new slice; schedule and counters as for fp32."""
    module = engine.module
    tied_owner = {key: owners[0] for key, _, _, owners in module.tied_groups()}
    by_name: dict[str, dict] = {}
    meta: dict = {}
    for s in range(len(record["bounds"]) - 1):
        found, m = ds_compat.read_bf16_state(tag_dir, s, record["dims"][1],
                                             lambda n: ds_compat.ds_param_name_to_layer_name(n, tied_owner))
        for name, values in found.items():
            by_name.setdefault(name, values)  # a tied copy: the owner's stage comes first
        meta = meta or m
    ds_compat.load_bf16_state(engine, by_name, meta, param_names(module))
    first = ds_compat.safe_load_or_refuse(ds_model_states_file(tag_dir, 0))
    if engine.lr_scheduler is not None and first.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(first["lr_scheduler"])
    ds_compat.restore_counters(engine, first)
    return {k: first[k] for k in ("step", "data") if k in first}
