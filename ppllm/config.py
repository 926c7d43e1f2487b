"""The run configuration (``configs/ds_config_pp.yml``): schema, validation, overrides.

One YAML holds three kinds of keys:
  * the topology (``model_topo``),
  * ppllm's run settings (paths, lengths, schedule, switches),
  * DeepSpeed's own keys, passed through to ``deepspeed.initialize``.

Everything is checked before any process group starts, and every problem is
reported at once with the key and the fix.
"""
from __future__ import annotations

import difflib
import glob
import os
from typing import Any, Literal

import yaml
from ppllm.lora import LoraConfig
from ppllm.partition import parts_problems
from ppllm.paths import layer_file
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Top-level keys DeepSpeed understands; they are passed through untouched.
DEEPSPEED_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "fp16", "bf16", "amp", "zero_optimization", "gradient_clipping", "steps_per_print",
    "wall_clock_breakdown", "prescale_gradients", "gradient_predivide_factor", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "activation_checkpointing", "pipeline", "tensorboard", "wandb", "csv_monitor",
    "comet", "comms_logger", "flops_profiler", "data_types", "communication_data_type", "checkpoint",
    "dump_state", "memory_breakdown", "sparse_gradients", "timers", "compile", "aio", "dataloader_drop_last",
    "disable_allgather", "torch_autocast", "seq_parallel_communication_data_type", "graph_harvesting",
    "use_data_before_expert_parallelism", "load_universal_checkpoint", "elasticity",
}


class Topology(BaseModel):
    model_config = ConfigDict(extra="forbid")
    axes: list[str] = Field(default=["pipe", "data"], description="must be [pipe, data]")
    dims: list[int] = Field(description="[pipeline stages, data-parallel replicas]")

    @field_validator("axes")
    @classmethod
    def _axes(cls, v):
        if v != ["pipe", "data"]:
            raise ValueError("must be [pipe, data]")
        return v

    @field_validator("dims")
    @classmethod
    def _dims(cls, v):
        if len(v) != 2 or any(d < 1 for d in v):
            raise ValueError("must be two positive integers [pipe, data], e.g. [2, 1]")
        return v


class ModelTopo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    process_topology: Topology
    #: layers per pipeline stage; omitted or "auto" balances compute
    parts: list[int] | Literal["auto"] | None = None


class LrSchedule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: cosine decays to min_lr_ratio * lr after warmup; constant keeps lr after warmup
    type: Literal["cosine", "constant"] = "cosine"
    #: linear warmup steps (or warmup_ratio of the total)
    warmup_steps: int | None = Field(default=None, ge=0)
    warmup_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    #: final lr as a fraction of the peak lr
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    #: schedule length; default: the number of optimizer steps this run will take
    total_steps: int | None = Field(default=None, ge=1)


class RunConfig(BaseModel):
    """ppllm's own keys. DeepSpeed keys live in ``ds`` (not declared here)."""
    model_config = ConfigDict(extra="forbid")

    model_topo: ModelTopo
    #: folder written by ``convert_model.py hg_to_pp`` (or a training checkpoint tag folder)
    model_path: str
    #: initialise weights randomly instead of loading layer files (config.json still from model_path)
    from_scratch: bool = False
    #: where checkpoints and metrics.jsonl go
    save_path: str
    #: one file, a list of files, or glob patterns (JSON array or JSON Lines)
    data_path: str | list[str]
    #: tokenizer folder; defaults to model_path
    tokenizer_path: str | None = None
    #: every micro-batch is [micro_batch, max_seq_len] tokens
    max_seq_len: int = Field(default=1024, ge=8)
    #: passes over the data
    n_epoches: int = Field(default=1, ge=1)
    #: stop after this many optimizer steps (beats n_epoches)
    max_steps: int | None = Field(default=None, ge=1)
    #: save a checkpoint every N optimizer steps (and always at the end)
    save_interval: int | None = Field(default=None, ge=1)
    seed: int = 42
    #: checkpoint every decoder layer's activations (non-reentrant)
    use_grad_ckpt: bool = False
    #: flash-attn 2 on CUDA when installed; otherwise SDPA with a notice
    use_flash_attn: bool = False
    #: pack several samples per row (attention never crosses documents); false pads each sample
    packing: bool = True
    #: prompt template: auto picks from the model config
    template: Literal["auto", "plain", "llama2", "llama3", "chatglm3", "baichuan2", "chatml"] = "auto"
    #: system text for every chat sample that has none of its own (a sample's `system` wins)
    system_prompt: str | None = None
    #: what to do with a sample longer than max_seq_len
    overlong: Literal["truncate", "drop"] = "truncate"
    #: stop before training when any sample is malformed, listing every FILE:LINE; false skips bad samples
    #: and reports a count per reason
    strict: bool = True
    #: sampling weight per data_path entry (same order; a glob's files share its weight): 2.0 uses a source
    #: twice per epoch, 0.5 a seeded half of it
    data_weights: list[float] | None = None
    #: print the loss every N steps on rank 0 (0 = progress bar only)
    log_interval: int = Field(default=1, ge=0)
    #: auto: continue from save_path/latest when there is one; never; or a checkpoint folder
    resume: str = "auto"
    #: keep only the newest N checkpoints (None keeps all)
    keep_last: int | None = Field(default=None, ge=1)
    #: auto = bf16 on CUDA, fp32 on CPU; the loss is computed in fp32 in every mode
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    #: parameters whose qualified name contains one of these get no weight decay (norm weights always)
    no_decay: list[str] = Field(default_factory=lambda: ["bias", "norm"])
    #: warmup + cosine learning-rate schedule, used when no DeepSpeed `scheduler` is given
    lr_schedule: LrSchedule = Field(default_factory=LrSchedule)
    #: held-out data (same formats as data_path) evaluated every eval_interval steps and at the end
    eval_data_path: str | list[str] | None = None
    eval_interval: int | None = Field(default=None, ge=1)
    #: peak accelerator TFLOP/s for the MFU estimate (default from the device type)
    peak_tflops: float | None = Field(default=None, gt=0)
    #: write tensorboard event files to save_path/tensorboard
    tensorboard: bool = True
    #: low-rank adapters {r, alpha, dropout, target_modules}; base weights are frozen
    lora: LoraConfig | None = None
    #: seconds without a heartbeat from a rank before every rank stops with a message naming it (0 = off)
    watchdog_timeout: float = Field(default=30.0, ge=0)
    #: seconds a collective may wait for the other ranks before it fails (the process-group timeout)
    dist_timeout: float = Field(default=1800.0, gt=0)


PPLLM_KEYS = set(RunConfig.model_fields) | {"epochs"}


class ConfigError(Exception):
    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s) in the config:\n" +
                         "\n".join(f"  - {p}" for p in problems))


class Config:
    """Validated run settings plus the DeepSpeed dict."""

    def __init__(self, run: RunConfig, ds: dict, source: str):
        self.run = run
        self.ds = ds
        self.source = source

    @property
    def pipe(self) -> int:
        return self.run.model_topo.process_topology.dims[0]

    @property
    def data(self) -> int:
        return self.run.model_topo.process_topology.dims[1]

    @property
    def world_size(self) -> int:
        return self.pipe * self.data

    @property
    def micro_batch(self) -> int:
        return int(self.ds["train_micro_batch_size_per_gpu"])

    @property
    def grad_accum(self) -> int:
        return int(self.ds["gradient_accumulation_steps"])

    @property
    def tokenizer_path(self) -> str:
        return self.run.tokenizer_path or self.run.model_path

    def data_files(self) -> list[str]:
        return expand_data_paths(self.run.data_path)


def expand_data_paths(data_path: str | list[str]) -> list[str]:
    items = [data_path] if isinstance(data_path, str) else list(data_path)
    files: list[str] = []
    for item in items:
        if any(ch in item for ch in "*?["):
            files += sorted(glob.glob(item))
        else:
            files.append(item)
    return files


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, e.g. --set max_steps=10")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part} is not a mapping")
        node[path[-1]] = value
    return raw


def load_config(path: str, overrides: list[str] | None = None, world_size: int | None = None,
                check_paths: bool = True) -> Config:
    """Load, override, validate. Raises ConfigError listing every problem."""
    if not os.path.isfile(path):
        raise ConfigError(path, [f"config file not found: {path}"])
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(path, [f"not valid YAML: {e}"])
    if not isinstance(raw, dict):
        raise ConfigError(path, ["the top level must be a mapping of keys"])
    try:
        raw = apply_overrides(raw, overrides or [])
    except ValueError as e:
        raise ConfigError(path, [str(e)])
    return validate(raw, path, world_size, check_paths)


def validate(raw: dict, source: str, world_size: int | None = None, check_paths: bool = True) -> Config:
    problems: list[str] = []
    raw = dict(raw)
    if "epochs" in raw:
        if "n_epoches" in raw:
            problems.append("epochs and n_epoches both given: keep one")
        raw["n_epoches"] = raw.pop("epochs")

    # `tensorboard: true|false` is ppllm's own writer; a mapping is DeepSpeed's monitor section
    # ({enabled, output_path, job_name}), which then replaces ppllm's writer
    tb = raw.get("tensorboard")
    if isinstance(tb, dict):
        raw["tensorboard"] = False
    run_raw = {k: v for k, v in raw.items() if k in RunConfig.model_fields}
    ds = {k: v for k, v in raw.items() if k in DEEPSPEED_KEYS and k != "tensorboard"}
    if isinstance(tb, dict):
        ds["tensorboard"] = tb
    for key in raw:
        if key not in RunConfig.model_fields and key not in DEEPSPEED_KEYS:
            guess = difflib.get_close_matches(key, sorted(PPLLM_KEYS | DEEPSPEED_KEYS), n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else "; remove it"
            problems.append(f"{key}: unknown key{hint}")

    run: RunConfig | None = None
    try:
        run = RunConfig(**run_raw)
    except ValidationError as e:
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            if err["type"] == "missing":
                problems.append(f"{loc}: required key is missing; add it to the config")
            elif err["type"] == "extra_forbidden":
                problems.append(f"{loc}: unknown key; remove it")
            else:
                problems.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
        # keep checking the rest: drop the broken keys (defaults apply) and validate again
        failing = {err["loc"][0] for err in e.errors() if err["loc"]}
        try:
            run = RunConfig(**{k: v for k, v in run_raw.items() if k not in failing})
        except ValidationError:
            run = None

    problems += _check_batch(ds, run)
    if run is not None:
        problems += _check_precision(ds, run)
    if run is not None:
        pipe, data = run.model_topo.process_topology.dims
        if world_size is not None and pipe * data != world_size:
            problems.append(_world_size_message(pipe, data, world_size))
        if check_paths:
            problems += _check_paths(run)
        problems += _check_parts(run, check_paths)
        if run.max_seq_len % 8:
            pass  # allowed; a multiple of 8 is faster on GPUs
    if problems:
        raise ConfigError(source, problems)
    return Config(run, ds, source)


def _check_precision(ds: dict, run: RunConfig) -> list[str]:
    explicit = [k for k in ("bf16", "fp16") if isinstance(ds.get(k), dict) and ds[k].get("enabled")]
    if len(explicit) > 1:
        return ["bf16 and fp16 are both enabled; enable one (or use precision: bf16|fp16|fp32)"]
    if explicit and run.precision not in ("auto", explicit[0]):
        return [f"precision: {run.precision} conflicts with the DeepSpeed section {explicit[0]}.enabled: true; "
                f"keep one of them"]
    return []


def _world_size_message(pipe: int, data: int, world: int) -> str:
    fits = [f"[{p}, {world // p}]" for p in range(1, world + 1) if world % p == 0]
    return (f"model_topo.process_topology.dims: [{pipe}, {data}] needs {pipe * data} processes, but "
            f"{world} were launched. Launch with `deepspeed --num_gpus {pipe * data}` (or a hostfile with "
            f"{pipe * data} slots in total), or set dims to one of {', '.join(fits)} for {world} processes")


def _check_batch(ds: dict, run: RunConfig | None) -> list[str]:
    problems = []
    mbs = ds.get("train_micro_batch_size_per_gpu")
    gas = ds.get("gradient_accumulation_steps")
    tbs = ds.get("train_batch_size")
    dp = run.model_topo.process_topology.dims[1] if run else None
    for key, v in (("train_micro_batch_size_per_gpu", mbs), ("gradient_accumulation_steps", gas),
                   ("train_batch_size", tbs)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            problems.append(f"{key}: must be a positive integer (got {v!r})")
            return problems
    if mbs is None:
        mbs = 1
        ds["train_micro_batch_size_per_gpu"] = 1
    if gas is None:
        if tbs is not None and dp:
            if tbs % (mbs * dp):
                problems.append(f"train_batch_size: {tbs} is not divisible by micro batch {mbs} x data {dp}; "
                                f"use a multiple of {mbs * dp}")
                return problems
            gas = tbs // (mbs * dp)
        else:
            gas = 1
        ds["gradient_accumulation_steps"] = gas
    if tbs is not None and dp and tbs != mbs * gas * dp:
        problems.append(f"train_batch_size: {tbs} != micro batch {mbs} x gradient_accumulation_steps {gas} x "
                        f"data {dp} = {mbs * gas * dp}; drop train_batch_size or make them agree")
    ds.pop("train_batch_size", None)  # DeepSpeed derives it from the other two and the topology
    return problems


def _check_paths(run: RunConfig) -> list[str]:
    problems = []
    mp = run.model_path
    if not os.path.isdir(mp):
        problems.append(f"model_path: folder {mp!r} does not exist; create it with "
                        f"`python convert_model.py hg_to_pp --input-path HF_DIR --save-path {mp}`")
    elif not os.path.isfile(os.path.join(mp, "config.json")):
        problems.append(f"model_path: {mp!r} has no config.json; point it at a folder made by hg_to_pp")
    elif not run.from_scratch and not os.path.isfile(layer_file(mp, 0)):
        problems.append(f"model_path: {mp!r} has no layer files (layer_00-model_states.pt); convert a HF "
                        f"checkpoint with hg_to_pp, or set from_scratch: true")
    tp = run.tokenizer_path or mp
    if run.tokenizer_path is not None and not os.path.isdir(tp):
        problems.append(f"tokenizer_path: folder {tp!r} does not exist")
    files = expand_data_paths(run.data_path)
    if not files:
        problems.append(f"data_path: {run.data_path!r} matches no file")
    for f in files:
        if not os.path.isfile(f):
            problems.append(f"data_path: file {f!r} does not exist")
    for f in expand_data_paths(run.eval_data_path) if run.eval_data_path else []:
        if not os.path.isfile(f):
            problems.append(f"eval_data_path: file {f!r} does not exist")
    if run.resume not in ("auto", "never") and not os.path.isdir(run.resume):
        problems.append(f"resume: {run.resume!r} is not a folder; use auto, never, or a checkpoint folder")
    if os.path.exists(run.save_path) and not os.path.isdir(run.save_path):
        problems.append(f"save_path: {run.save_path!r} exists and is not a folder")
    return problems


def _check_parts(run: RunConfig, check_paths: bool) -> list[str]:
    parts = run.model_topo.parts
    pipe = run.model_topo.process_topology.dims[0]
    n = _pipe_layers(run) if check_paths else None
    if parts is None or parts == "auto":
        if n is not None and n < pipe:
            return [f"model_topo.process_topology.dims: {pipe} pipeline stages but the model has only {n} "
                    f"pipeline layers; use at most {n} stages"]
        return []
    return parts_problems(parts, n, pipe)


def _pipe_layers(run: RunConfig) -> int | None:
    try:
        from models import load_family
        fam, args = load_family(run.model_path)
        return fam.num_pipe_layers(args)
    except Exception:
        return None
