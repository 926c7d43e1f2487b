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
import math
import os
import re
from typing import Any, Literal

import yaml
from ppllm.ds_sections import check_launchable, check_sections
from ppllm.errors import UserError
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


class YamlLoader(yaml.SafeLoader):
    """YAML with floats as people write them: PyYAML (YAML 1.1) reads ``1e-4`` -- no dot -- as a string."""


YamlLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


class DuplicateKey(yaml.YAMLError):
    """A mapping names one key twice (PyYAML would silently keep the last)."""


def _construct_mapping(loader: YamlLoader, node, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` overrides are allowed
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node.start_mark)
        except TypeError:  # an unhashable key: PyYAML reports it itself
            continue
        if first is not key_node.start_mark:
            where = loader.source
            raise DuplicateKey(f"key {key!r} is given twice, at {where}:{first.line + 1} and "
                               f"{where}:{key_node.start_mark.line + 1} (the last would silently win); keep one")
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


def _construct_yaml_map(loader: YamlLoader, node):
    data: dict = {}
    yield data
    data.update(_construct_mapping(loader, node))


YamlLoader.source = "<text>"
YamlLoader.add_constructor("tag:yaml.org,2002:map", _construct_yaml_map)


def read_yaml(text: str, source: str = "<text>"):
    """YAML as ppllm reads it: 1e-4 is a float, and a key given twice in one mapping is an error
    naming ``source``:line of both."""
    loader = YamlLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def yaml_problem(e: yaml.YAMLError) -> str:
    """A PyYAML error in one line: what and where."""
    if isinstance(e, DuplicateKey):
        return str(e)
    mark = getattr(e, "problem_mark", None)
    what = " ".join(str(getattr(e, "problem", None) or e).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"not valid YAML{where}: {what}"


class Topology(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    axes: list[str] = Field(default=["pipe", "data"])
    """fixed"""
    dims: list[int]
    """`[stages, data-parallel replicas]`; the product must equal the number of launched processes"""

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
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    process_topology: Topology
    parts: list[int] | Literal["auto"] | None = "auto"
    """pipeline layers per stage, e.g. `[5, 4, 4, 4, 4, 4, 4, 6]`; must sum to L + 3 (embedding, decoder layers,
    final norm, head). `auto` balances the planner's cost per layer: compute in FLOPs per token (the embedding is
    nearly free, the head + loss costs 6·V·H) mixed with memory"""


class LrSchedule(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)
    type: Literal["cosine", "constant"] = "cosine"
    """cosine decays to min_lr_ratio * lr after warmup; constant keeps lr after warmup"""
    warmup_steps: int | None = Field(default=None, ge=0)
    """linear warmup steps (or warmup_ratio of the total)"""
    warmup_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    """warmup as a fraction of the schedule length, when warmup_steps is not given"""
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """final lr as a fraction of the peak lr"""
    total_steps: int | None = Field(default=None, ge=1)
    """schedule length; default: the number of optimizer steps this run will take"""


class DataSource(BaseModel):
    """One ``data_path`` entry with its own field names: ``{path: GLOB, text: content}`` reads the
    column (or JSON key) ``content`` as ``text``. Every key but ``path`` names the source column
    of a sample field."""
    model_config = ConfigDict(extra="forbid")

    path: str
    text: str | None = None
    messages: str | None = None
    conversations: str | None = None
    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    system: str | None = None
    rounds: str | None = None

    def fields(self) -> dict[str, str] | None:
        """{sample field: source column} of the keys given, or None."""
        out = {k: v for k, v in self.model_dump(exclude={"path"}).items() if v is not None}
        return out or None


class RunConfig(BaseModel):
    """ppllm's own keys. DeepSpeed keys live in ``ds`` (not declared here)."""
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model_topo: ModelTopo
    model_path: str
    """folder made by `hg_to_pp` or a checkpoint tag folder"""
    from_scratch: bool = False
    """random init (HF-style normal, `initializer_range`) instead of loading layer files"""
    save_path: str
    """checkpoints and `metrics.jsonl`"""
    data_path: str | DataSource | list[str | DataSource]
    """a file, a folder made by `datasets`' `save_to_disk`, glob patterns, or a list of them; JSON Lines or JSON
    arrays (plain, `.gz`, `.zst`, `.bz2`, `.xz`), Parquet, Arrow. An entry `{path: P, text: content}` maps other
    field names (see Data)"""
    tokenizer_path: str | None = None
    """tokenizer folder; default: `model_path`"""
    max_seq_len: int = Field(default=1024, ge=8)
    """every micro-batch is `[micro_batch, max_seq_len]` tokens (the row length)"""
    n_epoches: int = Field(default=1, ge=1)
    """passes over the data (`epochs` is accepted too)"""
    max_steps: int | None = Field(default=None, ge=1)
    """caps optimizer steps (beats `n_epoches`)"""
    save_interval: int | None = Field(default=None, ge=1)
    """save every N steps (always at the end)"""
    seed: int = 42
    """layer init, data order; a whole number from 0 to 2**32 - 1"""
    use_grad_ckpt: bool = False
    """activation checkpointing of every decoder layer (non-reentrant)"""
    schedule: Literal["1f1b", "zb-h1"] = "1f1b"
    """pipeline schedule: `1f1b` (DeepSpeed's) or `zb-h1` (zero-bubble: each backward split into the input's
    gradient and the linear weights' gradients, the latter deferred into the bubbles; 1F1B's activations in
    flight, plus the deferred weight-gradient inputs). `zb-h1` runs in fp32 without ZeRO or in bf16 with fp32 gradient
    sums (ppllm's bf16 route), not in fp16 (see Pipeline schedules)"""
    use_flash_attn: bool = False
    """flash-attn 2 varlen kernels on CUDA in bf16/fp16 when installed (bloom through its ALiBi slopes); otherwise
    `attention`, with one notice"""
    attention: Literal["blockwise", "dense"] = "blockwise"
    """the torch attention backend (CPU, fp32, or no flash-attn): `blockwise`, ppllm's online-softmax kernel with
    memory linear in the sequence length, or `dense`, SDPA under an S x S document mask (memory grows with S^2)"""
    loss_chunk_mb: int | None = Field(default=None, ge=1)
    """MiB of fp32 logits the chunked loss forms at a time; default 1024 on a GPU, 32 on CPU (`--plan` follows it)"""
    packing: bool = True
    """several samples share a row: best fit, positions restart per document, attention never crosses documents,
    and no label spans two documents. `false` puts one sample per row with padding"""
    template: Literal["auto", "plain", "llama2", "llama3", "chatglm3", "baichuan2", "chatml"] = "auto"
    """`plain`, `llama2`, `llama3`, `chatglm3`, `baichuan2`, `chatml`; `auto` picks from the model config (see
    Data)"""
    system_prompt: str | None = None
    """system text for every chat sample that has none of its own (a sample's `system` wins)"""
    overlong: Literal["truncate", "drop"] = "truncate"
    """for conversations and instructions: `truncate` cuts at the last turn boundary that fits (after an answer), or
    hard at `max_seq_len` when no turn fits; `drop` drops the sample. Both are counted. Pretraining text is never
    cut: a long document becomes consecutive windows (see Long pretraining documents)"""
    strict: bool = True
    """stop on any malformed sample, listing every one; `false` skips bad samples and counts them per reason"""
    data_weights: list[float] | None = None
    """one weight per `data_path` entry. 2.0 uses a source twice per epoch; 0.5 uses a seeded half of it; 0 leaves
    it out"""
    log_interval: int = Field(default=1, ge=0)
    """log line every N steps when not on a terminal"""
    resume: str = "auto"
    """`auto` continues from `save_path/latest` when there is one; `never`; or a checkpoint folder"""
    keep_last: int | None = Field(default=None, ge=1)
    """keep only the newest N checkpoints"""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """`bf16`, `fp16` (dynamic loss scaling) or `fp32`; `auto` = bf16 on CUDA, fp32 on CPU. An explicit DeepSpeed
    `bf16`/`fp16` section wins. The loss is always computed in fp32"""
    no_decay: list[str] = Field(default_factory=lambda: ["bias", "norm"])
    """parameter-name substrings without weight decay (norm weights never decay)"""
    lr_schedule: LrSchedule = Field(default_factory=LrSchedule)
    """`{type: cosine|constant, warmup_steps or warmup_ratio, min_lr_ratio: 0.1, total_steps}`; used when no
    DeepSpeed `scheduler` is given; `total_steps` defaults to the steps this run takes (data size × epochs ÷
    batch, capped by `max_steps`)"""
    cache_dir: str | None = None
    """folder of the prepared data (tokens and labels); on a shared filesystem, one folder for the whole cluster:
    `python -m ppllm.prepare` fills it ahead of the run, spread over machines with `--share K/N`, and no node
    tokenizes what another has prepared. Default: `.ppllm-cache` beside each data file"""
    eval_data_path: str | DataSource | list[str | DataSource] | None = None
    """held-out data evaluated every N steps and at the end; token-weighted `eval_loss` in `metrics.jsonl`"""
    eval_interval: int | None = Field(default=None, ge=1)
    """evaluate eval_data_path every N steps (and at the end)"""
    peak_tflops: float | None = Field(default=None, gt=0)
    """peak for the MFU estimate (H100/H200 989, A100 312, …)"""
    tensorboard: bool = True
    """event files in `save_path/tensorboard`"""
    lora: LoraConfig | None = None
    """`{r: 8, alpha: 16, dropout: 0.0, target_modules: [q_proj, v_proj]}`; see LoRA"""
    watchdog_timeout: float = Field(default=30.0, ge=0)
    """seconds without a rank's heartbeat before every rank stops, naming it; `0` disables (see Multi-node)"""
    dist_timeout: float = Field(default=1800.0, gt=0)
    """process-group timeout in seconds: the longest a collective may wait for live but stuck ranks"""

    @field_validator("seed")
    @classmethod
    def _seed(cls, v):
        if not 0 <= v <= SEED_MAX:
            raise ValueError(f"must be a whole number from 0 to 2**32 - 1 = {SEED_MAX} (numpy's seed range); "
                             f"pick another seed")
        return v

    @field_validator("data_weights")
    @classmethod
    def _weights(cls, v):
        for i, w in enumerate(v or []):
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"entry {i + 1} is {w}; every weight must be a finite number >= 0 (0 leaves that "
                                 f"data_path entry out)")
        return v


SEED_MAX = 2 ** 32 - 1
PPLLM_KEYS = set(RunConfig.model_fields) | {"epochs"}


def _default_text(field) -> str:
    from pydantic_core import PydanticUndefined
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if value is PydanticUndefined or value is None:
        return "none"
    if isinstance(value, BaseModel):
        return "see meaning"
    return "`" + yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip().removesuffix("...").strip() + "`"


def config_rows(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, meaning) for every ppllm key, from the schema's field docstrings."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if name == "model_topo" or ann in (ModelTopo, Topology):
            rows += config_rows(ann, f"{prefix}{name}.")
            continue
        rows.append((prefix + name, _default_text(field), " ".join((field.description or "").split())))
    return rows


def describe_config(markdown: bool = True) -> str:
    """The README's config table (``train_pp.py --help-config``); generated, never edited by hand."""
    rows = config_rows()
    if markdown:
        cell = lambda t: t.replace("|", "\\|")  # noqa: E731
        return "\n".join(["| key | default | meaning |", "|---|---|---|"]
                         + [f"| `{k}` | {cell(d)} | {cell(m)} |" for k, d, m in rows])
    width = max(len(k) for k, _, _ in rows)
    return "\n".join(f"{k:<{width}}  {d:<12} {m}" for k, d, m in rows)


class ConfigError(UserError):
    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        if len(problems) == 1:  # the usual case: one line
            super().__init__(f"{source}: {problems[0]}")
        else:
            super().__init__(f"{source}: {len(problems)} problems in the config:\n" +
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

    def data_fields(self, eval_data: bool = False) -> list[dict | None]:
        """The field mapping of every file of ``data_files()`` (of the eval files with ``eval_data``)."""
        return data_path_fields(self.run.eval_data_path if eval_data else self.run.data_path)


def _entries(data_path) -> list:
    if data_path is None:
        return []
    return list(data_path) if isinstance(data_path, list) else [data_path]


def _expand_one(item) -> list[str]:
    path = item.path if isinstance(item, DataSource) else item["path"] if isinstance(item, dict) else item
    if any(ch in path for ch in "*?["):
        found = sorted(glob.glob(path, recursive=True))
    else:
        found = [path]
    out = []
    for f in found:
        if os.path.isdir(f):
            from data.records import arrow_folder_files
            out += arrow_folder_files(f)
        else:
            out.append(f)
    return out


def expand_data_paths(data_path) -> list[str]:
    """The files of ``data_path``: globs expanded (``**`` too), a ``save_to_disk`` folder as its Arrow files."""
    return [f for item in _entries(data_path) for f in _expand_one(item)]


def data_path_fields(data_path) -> list[dict | None]:
    """The field mapping of each file of ``expand_data_paths(data_path)`` (None: the usual names)."""
    out = []
    for item in _entries(data_path):
        if isinstance(item, dict):
            item = DataSource(**item)
        fields = item.fields() if isinstance(item, DataSource) else None
        out += [fields] * len(_expand_one(item))
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``--set KEY.SUB=VALUE`` as (path, value); a ValueError in one line naming the expression."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, e.g. --set max_steps=10")
    key, value = text.split("=", 1)
    path = [p.strip() for p in key.strip().split(".")]
    if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", p) for p in path):
        raise ValueError(f"--set {text!r}: {key.strip()!r} is not a key (dotted names such as "
                         f"optimizer.params.lr); write --set KEY=VALUE")
    try:
        return path, read_yaml(value, "--set")
    except yaml.YAMLError as e:
        raise ValueError(f"--set {text!r}: the value is {yaml_problem(e)}; quote it if it is a string, e.g. "
                         f"--set '{key.strip()}=\"...\"'") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides or []:
        path, value = parse_override(item)
        node = raw
        for i, part in enumerate(path[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {'.'.join(path[:i + 1])} is {node!r}, not a mapping with keys")
        node[path[-1]] = value
    return raw


def load_config(path: str, overrides: list[str] | None = None, world_size: int | None = None,
                check_paths: bool = True) -> Config:
    """Load, override, validate. Raises ConfigError listing every problem."""
    if os.path.isdir(path):
        raise ConfigError(path, ["is a folder; --config takes a YAML file (e.g. configs/ds_config_pp.yml)"])
    if not os.path.isfile(path):
        raise ConfigError(path, [f"config file not found: {path}"])
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(path, [f"cannot be read ({e.strerror}); check its permissions"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(path, [f"not UTF-8 text: byte 0x{data[e.start]:02x} at line {line} (offset {e.start}); "
                                 f"save the file as UTF-8"]) from None
    try:
        raw = read_yaml(text, path)
    except yaml.YAMLError as e:
        raise ConfigError(path, [yaml_problem(e)]) from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(path, ["the top level must be a mapping of keys"])
    try:
        raw = apply_overrides(raw, overrides or [])
    except ValueError as e:
        raise ConfigError(path, [str(e)]) from None
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
                msg = err["msg"].removeprefix("Value error, ")
                problems.append(f"{loc}: {msg} (got {err.get('input')!r})")
        # keep checking the rest: drop the broken keys (defaults apply) and validate again
        failing = {err["loc"][0] for err in e.errors() if err["loc"]}
        try:
            run = RunConfig(**{k: v for k, v in run_raw.items() if k not in failing})
        except ValidationError:
            run = None

    problems += _check_batch(ds, run)
    problems += check_sections(ds, lr_schedule_given="lr_schedule" in raw)
    problems += check_launchable(ds)
    if run is not None:
        problems += _check_precision(ds, run)
        problems += _check_schedule(ds, run)
    if run is not None:
        pipe, data = run.model_topo.process_topology.dims
        if world_size is not None and pipe * data != world_size:
            problems.append(_world_size_message(pipe, data, world_size))
        if check_paths:
            problems += _check_paths(run)
        problems += _check_parts(run, check_paths)
        if check_paths and run.lora is not None:
            problems += _check_lora_targets(run)
        if check_paths:
            problems += _check_positions(run)
        if run.eval_interval is not None and run.eval_data_path is None:
            problems.append(f"eval_interval: {run.eval_interval} but there is no eval_data_path to evaluate; set "
                            f"eval_data_path or remove eval_interval")
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


def _check_schedule(ds: dict, run: RunConfig) -> list[str]:
    """ZB-H1 defers weight gradients past the point where DeepSpeed's fp16 optimizer and ZeRO's optimizer
    take them, so it runs on the plain fp32 path or under DeepSpeed's bf16 optimizer (bf16 weights with
    fp32 gradient sums, ppllm's bf16 route; or bf16 sums without ZeRO), whose buffers its W's fill."""
    if run.schedule != "zb-h1":
        return []
    explicit = [k for k in ("bf16", "fp16") if isinstance(ds.get(k), dict) and ds[k].get("enabled")]
    precision = explicit[0] if explicit else run.precision
    if precision == "auto":
        from ppllm.launch import accelerator_name
        precision = "fp32" if accelerator_name() == "cpu" else "bf16"
    zero_cfg = ds.get("zero_optimization") or {}
    zero = int(zero_cfg.get("stage", 0) or 0)
    offload = (zero_cfg.get("offload_optimizer") or {}).get("device") == "cpu"
    accum = (ds.get("data_types") or {}).get("grad_accum_dtype")
    if precision == "fp32" and not zero:
        return []
    if precision == "bf16" and not offload and (accum in (None, "fp32") and zero <= 1 or accum == "bf16" and not zero):
        return []
    if precision == "bf16":
        what = ("optimizer offload" if offload else f"zero_optimization.stage {zero}" if zero > 1 else
                f"data_types.grad_accum_dtype {accum} with zero_optimization.stage {zero}")
    else:
        what = f"precision {precision}" if precision != "fp32" else f"zero_optimization.stage {zero}"
    return [f"schedule: zb-h1 runs in fp32 without ZeRO, or in bf16 with DeepSpeed's bf16 optimizer (fp32 gradient "
            f"sums, ZeRO stage 0 or 1, no offload), not with {what}; use schedule: 1f1b, or one of those"]


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
    if os.path.exists(mp) and not os.path.isdir(mp):
        problems.append(f"model_path: {mp!r} is a file, not a folder; point it at the folder made by "
                        f"`python convert_model.py hg_to_pp` (the one holding config.json and the layer files)")
    elif not os.path.isdir(mp):
        problems.append(f"model_path: folder {mp!r} does not exist; create it with "
                        f"`python convert_model.py hg_to_pp --input-path HF_DIR --save-path {mp}`")
    elif not os.path.isfile(os.path.join(mp, "config.json")):
        problems.append(f"model_path: {mp!r} has no config.json; point it at a folder made by hg_to_pp")
    elif not run.from_scratch and not os.path.isfile(layer_file(mp, 0)):
        problems.append(f"model_path: {mp!r} has no layer files (layer_00-model_states.pt); convert a HF "
                        f"checkpoint with hg_to_pp, or set from_scratch: true")
    tp = run.tokenizer_path or mp
    if run.tokenizer_path is not None and os.path.isfile(tp):
        problems.append(f"tokenizer_path: {tp!r} is a file, not a folder; give the folder holding the tokenizer files")
    elif run.tokenizer_path is not None and not os.path.isdir(tp):
        problems.append(f"tokenizer_path: folder {tp!r} does not exist")
    for key, value in (("data_path", run.data_path), ("eval_data_path", run.eval_data_path)):
        try:
            files = expand_data_paths(value)
        except UserError as e:  # a folder that is not a save_to_disk folder
            problems.append(f"{key}: {e}")
            continue
        if not files and value is not None:
            problems.append(f"{key}: {value!r} matches no file")
        for f in files:
            if not os.path.isfile(f):
                problems.append(f"{key}: file {f!r} does not exist")
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


def _family(run: RunConfig):
    """(family, model args) of model_path, or None when it cannot be read (reported elsewhere)."""
    try:
        from models import load_family
        return load_family(run.model_path)
    except Exception:
        return None


def _pipe_layers(run: RunConfig) -> int | None:
    found = _family(run)
    return found[0].num_pipe_layers(found[1]) if found else None


def _check_lora_targets(run: RunConfig) -> list[str]:
    found = _family(run)
    if found is None:
        return []
    from ppllm.lora import linear_names
    family, margs = found
    names = linear_names(family, margs)
    problems = []
    for target in run.lora.target_modules:
        if target not in names:
            guess = difflib.get_close_matches(target, sorted(names), n=1, cutoff=0.5)
            hint = f"did you mean {guess[0]!r}? " if guess else ""
            problems.append(f"lora.target_modules: {target!r} is not a linear layer of {family.name}; {hint}"
                            f"its linear layers are {', '.join(sorted(names))}")
    return problems


# the largest position a model has, by config.json key: rotary tables, learned positions
_POSITION_KEYS = ("max_position_embeddings", "seq_length", "n_positions")


def _check_positions(run: RunConfig) -> list[str]:
    """max_seq_len within the positions the model was built for (models without a limit, such as
    ALiBi's bloom, are not checked)."""
    import json
    try:
        with open(os.path.join(run.model_path, "config.json"), encoding="utf-8") as f:
            mcfg = json.load(f)
    except (OSError, ValueError):
        return []  # reported by the path checks or when the model loads
    for key in _POSITION_KEYS:
        limit = mcfg.get(key) if isinstance(mcfg, dict) else None
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            if run.max_seq_len > limit:
                return [f"max_seq_len: {run.max_seq_len} is above the model's {key} {limit} "
                        f"({os.path.join(run.model_path, 'config.json')}); use max_seq_len <= {limit}"]
            return []
    return []
