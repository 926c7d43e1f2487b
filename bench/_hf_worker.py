"""Baseline worker: transformers Trainer + DeepSpeed ZeRO on the rows ppllm would train on.

Launched by the benchmarks through ``deepspeed --num_gpus N bench/_hf_worker.py ...``.
Rows come from ppllm's own data pipeline (same files, template, max_seq_len, packing and
seed), in the order ppllm's StepLoader takes them, so optimizer step k covers the same
rows as ppllm's step k.  Packed rows go in with their ``position_ids``, a [1, S, S] boolean
attention mask that keeps each token inside its own document (causal), as ppllm's attention
does, and labels shifted back to the HF convention. (Position ids alone do not do that: under
SDPA transformers then attends across the documents of a row; ``--cross-doc`` measures that.)
Rank 0 writes the per-step wall times and real-token counts as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time



def rows_in_ppllm_order(data: str, tok_dir: str, seq: int, seed: int, rows_per_step: int, steps: int) -> dict:
    """The rows of ppllm's first `steps` optimizer steps (data-parallel 1), concatenated in order."""
    from data.dataset import StepLoader, build_rows
    from data.templates import get_template
    from data.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_dir, "llama")
    rows, _ = build_rows([data], get_template("plain", tok, "llama"), seq, packing=True, seed=seed)
    stream = StepLoader(rows, rows_per_step, 1, 0, 1, seed)  # its continuous stream of epochs
    return rows.get(stream.stream(0, steps * rows_per_step))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="HF folder (weights, or config only with --from-config)")
    p.add_argument("--from-config", action="store_true", help="random init from config.json")
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--micro-batch", type=int, required=True, help="rows per micro-batch per rank")
    p.add_argument("--grad-accum", type=int, required=True, help="per rank")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--cross-doc", action="store_true", help="no document mask: attention across packed documents")
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=None)
    a = p.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    rows_per_step = a.micro_batch * a.grad_accum * world
    rows = rows_in_ppllm_order(a.data, a.tokenizer, a.seq, a.seed, rows_per_step, a.steps)
    ids = torch.from_numpy(rows["input_ids"])
    pos = torch.from_numpy(rows["position_ids"])
    docs = torch.from_numpy(rows["doc_ids"])
    causal = torch.ones(a.seq, a.seq, dtype=torch.bool).tril()
    real = (docs >= 0).sum(-1)
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = torch.from_numpy(rows["labels"])[:, :-1]  # ppllm's are already shifted
    tokens_per_step = real.view(a.steps, rows_per_step).sum(-1).tolist()

    # train_batch_size is left to DeepSpeed (micro x accum x its world size): on a CPU-only machine
    # accelerate sets up DeepSpeed but counts one process, so "auto" would come out world-size 1.
    ds_cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "steps_per_print": 10 ** 9,
              "zero_optimization": {"stage": a.zero},
              "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                        "weight_decay": "auto"}}}
    if not torch.cuda.is_available():
        ds_cfg["optimizer"]["params"]["torch_adam"] = True  # DeepSpeed's fused Adam needs CUDA
    if a.precision == "bf16":
        ds_cfg["bf16"] = {"enabled": True}
    args = TrainingArguments(
        output_dir=os.path.join(os.path.dirname(os.path.abspath(a.out)), "hf_trainer_out"),
        per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=a.grad_accum, max_steps=a.steps, learning_rate=1e-4, adam_beta1=0.9,
        adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant",
        warmup_steps=0, bf16=a.precision == "bf16", deepspeed=ds_cfg, train_sampling_strategy="sequential",
        save_strategy="no", report_to="none", logging_steps=10 ** 6, disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False, seed=a.seed, dataloader_drop_last=True)
    # Global step k = rows [k R, (k+1) R). When accelerate shards the loader itself (it knows the
    # world size), give it every row; when it counts one process (CPU), give each rank its half.
    if args.world_size == world:
        local = torch.arange(len(ids))
    else:
        per_rank = rows_per_step // world
        local = torch.cat([torch.arange(k * rows_per_step + rank * per_rank, k * rows_per_step + (rank + 1) * per_rank)
                           for k in range(a.steps)])

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(local)

        def __getitem__(self, i):
            j = int(local[i])
            row = {"input_ids": ids[j], "labels": labels[j], "position_ids": pos[j]}
            if not a.cross_doc and a.attn != "flash_attention_2":  # flash-attn 2 splits documents by position ids
                row["attention_mask"] = ((docs[j][:, None] == docs[j][None, :]) & causal)[None]
            return row

    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    if a.from_config:
        config = AutoConfig.from_pretrained(a.model)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=a.attn)
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation=a.attn)

    marks: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    class LossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kw)
            loss = out[0] if return_outputs else out
            losses.append(float(loss.detach()))
            return out

    trainer = LossTrainer(model=model, args=args, train_dataset=Rows(), callbacks=[Clock()],
                          data_collator=lambda items: {k: torch.stack([it[k] for it in items]) for k in items[0]})
    trainer.train()
    if rank == 0:
        step_times = [b - a_ for a_, b in zip(marks, marks[1:])]
        with open(a.out, "w") as f:
            json.dump({"step_times": step_times, "tokens": tokens_per_step[:len(step_times)],
                       "losses": losses, "world": world, "zero": a.zero,
                       "engine": type(trainer.model_wrapped).__name__, "hf_world_size": args.world_size}, f)
        print(f"hf worker: {len(step_times)} steps, ZeRO-{a.zero}, world {world}", flush=True)
    # Skip interpreter teardown: with ZeRO-3 on the CPU accelerator it aborts in a C++ destructor
    # ("terminate called without an active exception") after training has finished.
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
