"""What the DeepSpeed sections ppllm passes through may hold, checked before launch.

DeepSpeed reads ``optimizer``, ``scheduler``, ``bf16`` and ``fp16`` only inside
``deepspeed.initialize`` (on every rank, after the process group is up), and some mistakes
surface only at the first optimizer step. Here each section is checked when the config is
read, so the dry run and the launch stop on the same one-line message. Number-looking strings
where a number belongs (``"1e-4"``) are converted; anything else of the wrong type is refused
by its key.
"""
from __future__ import annotations

import difflib
from typing import Any

_NUM = "number"
_INT = "integer"
_BOOL = "bool"
_STR = "string"
_PAIR = "pair of numbers"

# accepted parameters per optimizer type (lower case); None: DeepSpeed's own op, names not checked here
OPTIMIZERS: dict[str, dict[str, str] | None] = {
    "adam": {"lr": _NUM, "betas": _PAIR, "eps": _NUM, "weight_decay": _NUM, "amsgrad": _BOOL,
             "bias_correction": _BOOL, "adam_w_mode": _BOOL, "torch_adam": _BOOL, "fused": _BOOL},
    "adamw": {"lr": _NUM, "betas": _PAIR, "eps": _NUM, "weight_decay": _NUM, "amsgrad": _BOOL,
              "bias_correction": _BOOL, "adam_w_mode": _BOOL, "torch_adam": _BOOL, "fused": _BOOL},
    "lion": {"lr": _NUM, "betas": _PAIR, "weight_decay": _NUM},
    "sgd": {"lr": _NUM, "momentum": _NUM, "dampening": _NUM, "weight_decay": _NUM, "nesterov": _BOOL},
    "adagrad": {"lr": _NUM, "eps": _NUM, "weight_decay": _NUM, "lr_decay": _NUM,
                "initial_accumulator_value": _NUM},
    "lamb": None, "onebitadam": None, "zerooneadam": None, "onebitlamb": None,
    "muadam": None, "muadamw": None, "musgd": None,
}
SCHEDULERS: dict[str, dict[str, str]] = {
    "WarmupLR": {"warmup_min_lr": _NUM, "warmup_max_lr": _NUM, "warmup_num_steps": _INT, "warmup_type": _STR,
                 "last_batch_iteration": _INT},
    "WarmupDecayLR": {"warmup_min_lr": _NUM, "warmup_max_lr": _NUM, "warmup_num_steps": _INT,
                      "total_num_steps": _INT, "warmup_type": _STR, "last_batch_iteration": _INT},
    "WarmupCosineLR": {"total_num_steps": _INT, "warmup_min_ratio": _NUM, "warmup_num_steps": _INT,
                       "cos_min_ratio": _NUM, "warmup_type": _STR, "last_batch_iteration": _INT},
    "OneCycle": {"cycle_min_lr": _NUM, "cycle_max_lr": _NUM, "decay_lr_rate": _NUM, "cycle_first_step_size": _INT,
                 "cycle_second_step_size": _INT, "cycle_first_stair_count": _INT,
                 "cycle_second_stair_count": _INT, "decay_step_size": _INT, "cycle_momentum": _BOOL,
                 "cycle_min_mom": _NUM, "cycle_max_mom": _NUM, "decay_mom_rate": _NUM,
                 "last_batch_iteration": _INT},
    "LRRangeTest": {"lr_range_test_min_lr": _NUM, "lr_range_test_step_size": _INT,
                    "lr_range_test_step_rate": _NUM, "lr_range_test_staircase": _BOOL},
}
PRECISION: dict[str, dict[str, str]] = {
    "bf16": {"enabled": _BOOL, "immediate_grad_update": _BOOL, "check_grad_overflow": _BOOL},
    "fp16": {"enabled": _BOOL, "auto_cast": _BOOL, "loss_scale": _NUM, "initial_scale_power": _INT,
             "loss_scale_window": _INT, "hysteresis": _INT, "consecutive_hysteresis": _BOOL,
             "min_loss_scale": _NUM, "fp16_master_weights_and_grads": _BOOL},
}
# DeepSpeed's WarmupLR / WarmupDecayLR ramp to warmup_max_lr (default 0.001) and ignore the optimizer's lr
_PEAK_LR_SCHEDULERS = {"WarmupLR", "WarmupDecayLR"}
_DS_DEFAULT_WARMUP_MAX_LR = 0.001


def _suggest(word: str, choices) -> str:
    guess = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"; did you mean {guess[0]!r}?" if guess else ""


def _coerce(key: str, value: Any, kind: str, problems: list[str]) -> Any:
    """The value as `kind`, converting number-looking strings; a problem naming `key` otherwise."""
    def number(v):
        if isinstance(v, bool):
            raise ValueError
        if isinstance(v, (int, float)):
            return v
        if isinstance(v, str):
            return float(v.strip())
        raise ValueError
    try:
        if kind == _NUM:
            return number(value)
        if kind == _INT:
            v = number(value)
            if float(v) != int(v):
                raise ValueError
            return int(v)
        if kind == _PAIR:
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise ValueError
            return [number(v) for v in value]
        if kind == _BOOL:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind == _STR:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (ValueError, TypeError):
        problems.append(f"{key}: must be a {kind} (got {value!r})")
    return value


def _check_params(section: str, params: Any, allowed: dict[str, str] | None, problems: list[str]) -> None:
    if params is None:
        return
    if not isinstance(params, dict):
        problems.append(f"{section}.params: must be a mapping (got {params!r})")
        return
    for name, value in list(params.items()):
        key = f"{section}.params.{name}"
        if allowed is None:
            continue
        if name not in allowed:
            problems.append(f"{key}: not a parameter of this {section}{_suggest(name, allowed)}; "
                            f"it takes {', '.join(sorted(allowed))}")
            continue
        params[name] = _coerce(key, value, allowed[name], problems)


def check_sections(ds: dict, lr_schedule_given: bool) -> list[str]:
    """Problems in the optimizer, scheduler and precision sections (values are converted in place)."""
    problems: list[str] = []
    opt = ds.get("optimizer")
    if opt is not None:
        if not isinstance(opt, dict) or not isinstance(opt.get("type"), str):
            problems.append("optimizer: needs a `type` (e.g. AdamW) and optional `params`")
        else:
            name = opt["type"].lower()
            if name not in OPTIMIZERS:
                problems.append(f"optimizer.type: {opt['type']!r} is not an optimizer DeepSpeed builds"
                                f"{_suggest(name, OPTIMIZERS)}; use one of AdamW, Adam, Lion, SGD, Adagrad, Lamb")
            else:
                _check_params("optimizer", opt.get("params"), OPTIMIZERS[name], problems)
    sched = ds.get("scheduler")
    if sched is not None:
        if not isinstance(sched, dict) or not isinstance(sched.get("type"), str):
            problems.append("scheduler: needs a `type` (e.g. WarmupLR) and `params`")
        elif sched["type"] not in SCHEDULERS:
            problems.append(f"scheduler.type: {sched['type']!r} is not a DeepSpeed scheduler"
                            f"{_suggest(sched['type'], SCHEDULERS)}; use one of {', '.join(SCHEDULERS)}")
        else:
            _check_params("scheduler", sched.get("params"), SCHEDULERS[sched["type"]], problems)
    for key, allowed in PRECISION.items():
        section = ds.get(key)
        if section is None:
            continue
        if not isinstance(section, dict):
            problems.append(f"{key}: must be a mapping such as {{enabled: true}} (got {section!r})")
            continue
        for name, value in list(section.items()):
            if name not in allowed:
                problems.append(f"{key}.{name}: not a {key} setting{_suggest(name, allowed)}; "
                                f"it takes {', '.join(sorted(allowed))}")
            else:
                section[name] = _coerce(f"{key}.{name}", value, allowed[name], problems)
    if not problems:
        problems += _check_lr(ds, lr_schedule_given)
    return problems


def _check_lr(ds: dict, lr_schedule_given: bool) -> list[str]:
    """The learning rate is set in one place, or the places agree."""
    sched = ds.get("scheduler")
    if sched is None:
        return []
    if lr_schedule_given:
        return [f"lr_schedule and the DeepSpeed scheduler ({sched['type']}) are both set, and only the DeepSpeed "
                f"scheduler would be used; remove one of them"]
    if sched["type"] not in _PEAK_LR_SCHEDULERS:
        return []
    params = sched.get("params") or {}
    peak = params.get("warmup_max_lr", _DS_DEFAULT_WARMUP_MAX_LR)
    lr = ((ds.get("optimizer") or {}).get("params") or {}).get("lr")
    if lr is not None and float(lr) != float(peak):
        where = ("scheduler.params.warmup_max_lr" if "warmup_max_lr" in params
                 else f"scheduler.params.warmup_max_lr (not set: DeepSpeed's default {peak})")
        return [f"optimizer.params.lr is {lr:g} but {where} is {float(peak):g}, and {sched['type']} ramps to "
                f"warmup_max_lr, ignoring the optimizer's lr; set both to the same value (e.g. --set "
                f"optimizer.params.lr={lr:g} --set scheduler.params.warmup_max_lr={lr:g})"]
    return []


# ZeRO stages DeepSpeed's PipelineEngine runs: it asserts stage < 2 in its constructor, on every rank
PIPELINE_ZERO_STAGES = (0, 1)


def _finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def check_launchable(ds: dict) -> list[str]:
    """Values that pass DeepSpeed's schema but stop every rank at ``deepspeed.initialize`` or the
    first step: a ZeRO stage the pipeline refuses, a learning rate that is not a positive number,
    a gradient clip below zero or infinite. Run after :func:`check_sections` (numbers converted)."""
    import math
    problems: list[str] = []
    zero = ds.get("zero_optimization")
    if zero is not None:
        if not isinstance(zero, dict):
            problems.append(f"zero_optimization: must be a mapping such as {{stage: 1}} (got {zero!r})")
        elif "stage" in zero:
            stage = zero["stage"]
            if isinstance(stage, bool) or not isinstance(stage, int):
                problems.append(f"zero_optimization.stage: must be the whole number 0 or 1 (got {stage!r}); "
                                f"write stage: 1")
            elif stage not in PIPELINE_ZERO_STAGES:
                problems.append(f"zero_optimization.stage: {stage} is not supported with pipeline parallelism "
                                f"(DeepSpeed's pipeline engine runs ZeRO stage 0 or 1 only); use stage: 1")
    params = (ds.get("optimizer") or {}).get("params") if isinstance(ds.get("optimizer"), dict) else None
    sched = ds.get("scheduler") if isinstance(ds.get("scheduler"), dict) else None
    lrs = [("optimizer.params.lr", params.get("lr"))] if isinstance(params, dict) and "lr" in params else []
    sparams = (sched or {}).get("params")
    if isinstance(sparams, dict):
        lrs += [(f"scheduler.params.{k}", sparams[k]) for k in ("warmup_max_lr", "cycle_max_lr") if k in sparams]
    for key, value in lrs:
        v = _finite_number(value)
        if v is None:
            continue  # a type problem, reported by check_sections
        if not math.isfinite(v) or v <= 0:
            problems.append(f"{key}: {value!r} is not a positive learning rate; use a finite number > 0, "
                            f"e.g. 1e-4")
    if "gradient_clipping" in ds:
        value = ds["gradient_clipping"]
        v = _finite_number(value)
        if isinstance(value, str):
            try:
                v = float(value.strip())
                ds["gradient_clipping"] = v
            except ValueError:
                v = None
        if v is None:
            problems.append(f"gradient_clipping: must be a number (got {value!r}); e.g. 1.0, or 0 for no clipping")
        elif not math.isfinite(v) or v < 0:
            problems.append(f"gradient_clipping: {value!r} must be a finite number >= 0 (the largest gradient norm; "
                            f"0 turns clipping off)")
    return problems
