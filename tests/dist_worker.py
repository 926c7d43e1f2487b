"""Runs inside `deepspeed --num_gpus N`: several pipeline scenarios in one launch.

For each scenario: build the engine from a pipeline folder, take ONE optimizer step
(SGD, lr 1) on synthetic batches, and dump this rank's updated layer weights and the
reported loss. The test compares them with an unpipelined reference.
"""
import json
import os
import sys

import torch

from models import load_family
from ppllm import ds_compat
from ppllm.engine import build_engine, grad_norm, train_step
from ppllm.lora import LoraConfig
from ppllm.partition import layer_costs, stage_bounds
from helpers import seed_lora, synthetic_batches  # this folder is on sys.path when run as a script


def fp32_master(module) -> dict:
    """The fp32 master weights of DeepSpeed's bf16 optimizer, by layer (a collective: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param
    out = {f"{index}.{k}": safe_get_full_fp32_param(p).detach().clone()
           for index, layer in module.local_layers() for k, p in layer.named_parameters() if p.requires_grad}
    for key, tied, attrs, _ in module.tied_groups():
        out.update({f"tied:{key}.{a}": safe_get_full_fp32_param(getattr(tied, a)).detach().clone() for a in attrs})
    return out


def main():
    import deepspeed
    spec_path, out_dir = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    with open(spec_path) as f:
        scenarios = json.load(f)
    deepspeed.init_distributed(dist_backend=None)
    world = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    for sc in scenarios:
        if sc["pipe"] * sc["data"] != world:
            continue
        fam, margs = load_family(sc["model_dir"])
        n = fam.num_pipe_layers(margs)
        bounds = stage_bounds(n, sc["pipe"], sc.get("parts"), layer_costs(fam, margs))
        ds = {"train_micro_batch_size_per_gpu": sc["mbs"], "gradient_accumulation_steps": sc["gas"],
              "optimizer": {"type": sc.get("optimizer", "SGD"), "params": {"lr": sc.get("lr", 1.0)}},
              "steps_per_print": 10 ** 9,
              "pipeline": {"use_reentrant": False}, "gradient_clipping": sc.get("clip", 0.0)}
        if sc.get("precision") == "bf16":  # ppllm's bf16 route: DeepSpeed's bf16 optimizer, fp32 sums and reduction
            ds.update({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True,
                       "data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"})
        if sc.get("zero"):
            ds["zero_optimization"] = {"stage": 1}
            ds["zero_allow_untested_optimizer"] = True
            if sc.get("offload"):
                ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        engine, _, _ = build_engine(fam, margs, bounds, sc["pipe"], sc["data"], ds, 0,
                                          sc.get("grad_ckpt", False), sc["model_dir"],
                                          lora=LoraConfig(**sc["lora"]) if sc.get("lora") else None,
                                          schedule=sc.get("schedule", "1f1b"))
        if sc.get("lora"):
            seed_lora(engine.module.local_layers())
        dp_rank = engine.grid.get_data_parallel_rank()
        allb = synthetic_batches(sc["seed"], sc["gas"] * sc["data"], sc["mbs"], sc["seq"], margs.vocab_size)
        mine = allb[dp_rank * sc["gas"]:(dp_rank + 1) * sc["gas"]]
        use = mine if (engine.is_first_stage() or engine.is_last_stage()) else None
        module = engine.module
        before = fp32_master(module) if sc.get("precision") == "bf16" else None
        loss = train_step(engine, use)
        layers = {index: {k: v.detach().clone() for k, v in layer.state_dict().items()}
                  for index, layer in module.local_layers()}
        for key, tied, attrs, _ in module.tied_groups():
            # the shared matrix as this stage holds it (on the last stage: the head's copy)
            layers[f"tied:{key}"] = {k: getattr(tied, k).detach().clone() for k in attrs}
        master = fp32_master(module) if sc.get("precision") == "bf16" else None
        torch.save({"loss": loss, "grad_norm": grad_norm(engine), "layers": layers, "bounds": bounds,
                    "zb": ds_compat.zb_h1_stats(engine), "master": master, "master_before": before},
                   os.path.join(out_dir, f"{sc['name']}_rank{rank}.pt"))
        torch.distributed.barrier()
    print(f"rank {rank}: done", flush=True)


if __name__ == "__main__":
    main()
