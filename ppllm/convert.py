"""Conversion between Hugging Face checkpoints and ppllm pipeline layer files.

``hg_to_pp`` maps every HF tensor through the family's declarative key map into per-layer
files; ``pp_to_hg`` inverts the same map and streams the tensors into the family's original
file layout. Both stream one tensor at a time and write into a staged folder that replaces
the output only when everything succeeded (``ppllm.paths.staged_output``).
The command line is ``convert_model.py``.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections import OrderedDict
from typing import Iterator

import torch
from tqdm import tqdm

from models import get_family, read_config
from ppllm import lora as lora_mod
from ppllm.paths import (LORA_META_FILE, META_FILE, PARTITION_FILE, copy_side_files, latest_target, layer_file,
                         layer_index, list_tags, staged_output)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class ConversionError(Exception):
    pass


# ---------------------------------------------------------------------------------------
# reading HF checkpoints


def hf_weight_files(folder: str) -> tuple[list[str], str]:
    """Weight files of a HF folder in index order, and their kind ('safetensors' or 'bin')."""
    for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = list(OrderedDict.fromkeys(weight_map.values()))
            missing = [n for n in files if not os.path.isfile(os.path.join(folder, n))]
            if missing:
                raise ConversionError(f"{index} names shard(s) that are not there: {', '.join(missing)}")
            return [os.path.join(folder, n) for n in sorted(files)], kind
    for name, kind in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)], kind
    raise ConversionError(f"{folder}: no model.safetensors, pytorch_model.bin or index file found")


def iter_hf_tensors(files: list[str], kind: str) -> Iterator[tuple[str, tuple, "callable"]]:
    """Yield (key, shape, loader) one tensor at a time; loader() materialises it."""
    for path in files:
        if kind == "safetensors":
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    shape = tuple(f.get_slice(key).get_shape())
                    yield key, shape, (lambda f=f, key=key: f.get_tensor(key))
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
            for key in list(state.keys()):
                t = state[key]
                yield key, tuple(t.shape), (lambda t=t: t)
            del state


def _own_copy(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return t.contiguous().clone()


def hg_to_pp(input_path: str, save_path: str, dtype: str | None = None, force: bool = False,
             quiet: bool = False) -> dict:
    cfg = read_config(input_path)
    family = get_family(cfg["model_type"])
    args = family.parse_config(cfg)
    keymap = family.key_map(args)
    expected = family.expected_shapes(args)
    files, kind = hf_weight_files(input_path)
    torch_dtype = DTYPES[dtype] if dtype else None

    total = sum(os.path.getsize(p) for p in files)
    pending: dict[int, dict[str, torch.Tensor]] = {}
    done: set[int] = set()
    seen: dict[int, set[str]] = {}
    problems: list[str] = []
    with staged_output(save_path, force) as tmp:
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="hg_to_pp", disable=quiet)
        for key, shape, load in iter_hf_tensors(files, kind):
            try:
                pp_key = keymap.to_pp(key)
            except KeyError:
                problems.append(f"unexpected key {key!r} for model_type {cfg['model_type']!r}")
                continue
            if pp_key is None:
                continue
            try:
                idx, local = family.locate(args, pp_key)
            except KeyError:
                problems.append(f"unexpected key {key!r} (maps to {pp_key!r}, which the config does not have)")
                continue
            want = expected.get(idx, {}).get(local)
            if want is None:
                problems.append(f"unexpected key {key!r} (the config has no {pp_key!r})")
                continue
            if tuple(shape) != tuple(want):
                problems.append(f"{key}: shape {list(shape)} but the config implies {list(want)}")
                continue
            seen.setdefault(idx, set()).add(local)
            if problems:  # keep checking keys, but stop loading data that will not be written
                continue
            t = load()
            bar.update(t.numel() * t.element_size())
            pending.setdefault(idx, {})[local] = _own_copy(t, torch_dtype)
            if len(pending[idx]) == len(expected[idx]):
                torch.save(pending.pop(idx), layer_file(tmp, idx))
                done.add(idx)
        bar.close()
        for idx, keys in expected.items():
            if idx in done:
                continue
            have = seen.get(idx, set())
            for local in keys:
                if local not in have:
                    slot = family.slot_of(args, idx)
                    problems.append(f"missing key {keymap.to_hf(slot + '.' + local)!r}")
        if problems:
            raise ConversionError(f"{input_path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
        copied = copy_side_files(input_path, tmp)
        meta = {"format": "ppllm-pipeline", "family": family.name, "model_type": cfg["model_type"],
                "num_pipe_layers": family.num_pipe_layers(args), "source_layout": kind,
                "dtype": dtype or "as-source", "layer_names": family.layer_names(args)}
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
    if not quiet:
        print(f"hg_to_pp: wrote {len(done)} layer files and {len(copied)} side files to {save_path}")
    return meta


# ---------------------------------------------------------------------------------------
# writing HF checkpoints


def resolve_pipeline_dir(input_path: str, tag: str | None = None) -> tuple[str, str]:
    """(folder with the layer files, folder with config.json) for a pp folder or a training save_path."""
    if not os.path.isdir(input_path):
        raise ConversionError(f"{input_path} does not exist (expected a pipeline folder from hg_to_pp, "
                              f"or a training save_path)")
    tags = list_tags(input_path)
    if tag:
        layers = os.path.join(input_path, tag)
        if not os.path.isdir(layers):
            have = f"tags there: {', '.join(tags)}" if tags else "it holds no checkpoint tags"
            raise ConversionError(f"tag {tag!r} not found in {input_path}; {have}")
    elif (latest := latest_target(input_path)) is not None:
        layers = os.path.join(input_path, latest)
        if not os.path.isdir(layers):
            have = f"; tags there: {', '.join(tags)} (pick one with --tag)" if tags else ""
            raise ConversionError(f"{input_path}/latest points to {latest!r}, which does not exist{have}")
    else:
        layers = input_path
    for cand in dict.fromkeys((layers, input_path)):
        if os.path.isfile(os.path.join(cand, "config.json")):
            return layers, cand
    where = " or ".join(dict.fromkeys((layers, input_path)))
    raise ConversionError(f"no config.json in {where}: not a pipeline folder (make one with "
                          f"convert_model.py hg_to_pp) or a training save_path")


class _Entry:
    """One output tensor of pp_to_hg: where it comes from and what it becomes."""
    __slots__ = ("key", "idx", "local", "shape", "dtype", "nbytes")

    def __init__(self, key, idx, local, shape, dtype):
        self.key, self.idx, self.local, self.shape, self.dtype = key, idx, local, shape, dtype
        self.nbytes = math.prod(shape) * dtype.itemsize


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def _write_safetensors(path: str, entries: list, tensor, bar=None) -> None:
    """A safetensors file written tensor by tensor: the header (names, dtypes, shapes, offsets) is
    known from the plan, so no tensor has to wait in memory for the others (the format is an
    8-byte little-endian header length, the JSON header padded to 8 bytes, then the raw data)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.key] = {"dtype": _ST_DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    if sys.byteorder != "little":
        raise ConversionError("safetensors export needs a little-endian machine")
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for e in entries:
            t = tensor(e).contiguous()
            if tuple(t.shape) != e.shape or t.dtype != e.dtype:
                raise ConversionError(f"{e.key}: got {t.dtype} {list(t.shape)}, planned {e.dtype} {list(e.shape)}")
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t
            if bar is not None:
                bar.update(e.nbytes)


def pp_to_hg(input_path: str, save_path: str, tag: str | None = None, dtype: str | None = None,
             force: bool = False, max_shard_bytes: int = 2 * 10 ** 9, quiet: bool = False,
             lora_only: bool = False, base_hf: str | None = None) -> dict:
    """HF checkpoint from a pipeline folder or training save_path. An adapter (LoRA) checkpoint is
    merged into its base weights, or with lora_only written as a PEFT adapter whose base is the HF
    export ``base_hf`` (written there when it does not exist yet; default ``save_path/base``)."""
    layers_dir, config_dir = resolve_pipeline_dir(input_path, tag)
    adapter = lora_mod.read_meta(layers_dir)
    if lora_only:
        if adapter is None:
            raise ConversionError(f"{layers_dir} holds no LoRA adapters (no {LORA_META_FILE})")
        return export_peft(layers_dir, config_dir, save_path, adapter, force, base_hf, quiet)
    cfg = read_config(config_dir)
    family = get_family(cfg["model_type"])
    args = family.parse_config(cfg)
    load_state = _layer_loader(layers_dir, adapter)
    # a LoRA merge keeps names, shapes and dtypes: plan from the base files, merge once while writing
    plan_dir = adapter["base_model_path"] if adapter else layers_dir
    entries, extras = _plan_export(family, args, plan_dir, layers_dir, adapter, DTYPES[dtype] if dtype else None)
    layout = family.export_layout(args)  # the family's original file layout
    with staged_output(save_path, force) as tmp:
        weight_map = _write_shards(tmp, _group_shards(entries, max_shard_bytes), layout, load_state, extras, quiet)
        copied = copy_side_files(config_dir, tmp)
        if layers_dir != config_dir:
            copied += copy_side_files(layers_dir, tmp)
        from ppllm.chat import write_chat_template
        chat = write_chat_template(tmp, cfg["model_type"])
    n = len(set(weight_map.values()))
    if not quiet:
        print(f"pp_to_hg: wrote {len(weight_map)} tensors in {n} shard(s) and {len(copied)} side files to {save_path}")
    if chat and chat.get("error"):
        print(f"pp_to_hg: warning: no chat_template written: {chat['error']}", file=sys.stderr)
    elif chat and not chat["exact"]:
        print(f"pp_to_hg: warning: the {chat['template']} chat_template written to tokenizer_config.json, tokenized "
              f"by this tokenizer, does not reproduce ppllm's prompt ids; prompt with python -m ppllm.chat or "
              f"data.templates", file=sys.stderr)
    return {"tensors": len(weight_map), "shards": n}


def _plan_export(family, args, plan_dir: str, layers_dir: str, adapter: dict | None,
                 torch_dtype: torch.dtype | None) -> tuple[list[_Entry], dict]:
    """Every output tensor, checked against the config from metadata alone (the layer files are
    memory-mapped and nothing is read), so the writer can stream each one straight into its shard."""
    keymap = family.key_map(args)
    expected = family.expected_shapes(args)
    missing = [layer_file(layers_dir, i) for i in sorted(expected)
               if not os.path.isfile(layer_file(layers_dir, i))
               and not (adapter and os.path.isfile(layer_file(adapter["base_model_path"], i)))]
    if missing:
        raise ConversionError(f"{layers_dir}: {len(missing)} layer file(s) missing:\n  " + "\n  ".join(missing)
                              + _stage_hint(layers_dir, missing))
    plan_state = _layer_loader(plan_dir, None)
    entries, problems = [], []
    out_dtype = None
    for idx in sorted(expected):
        path = layer_file(plan_dir, idx)
        state = plan_state(idx)
        want = expected[idx]
        extra, lacking = sorted(set(state) - set(want)), sorted(set(want) - set(state))
        if extra or lacking:
            problems.append(f"{path}: missing {lacking}, unexpected {extra}")
            continue
        slot = family.slot_of(args, idx)
        for local in want:
            t = state[local]
            if tuple(t.shape) != tuple(want[local]):
                problems.append(f"{path}: {local} has shape {list(t.shape)}, config implies {list(want[local])}")
                continue
            dt = torch_dtype if torch_dtype is not None and t.is_floating_point() else t.dtype
            out_dtype = out_dtype or dt
            entries.append(_Entry(keymap.to_hf(f"{slot}.{local}"), idx, local, tuple(t.shape), dt))
        del state
    if problems:
        raise ConversionError(f"{layers_dir}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    extras = family.export_extra(args, out_dtype or torch.float32)
    entries += [_Entry(k, None, k, tuple(t.shape), t.dtype) for k, t in extras.items()]
    return entries, extras


def _group_shards(entries: list[_Entry], max_shard_bytes: int) -> list[list[_Entry]]:
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def _write_shards(tmp: str, shards: list[list[_Entry]], layout: str, load_state, extras: dict,
                  quiet: bool) -> dict[str, str]:
    """Write the shards with HF's names and their index; one layer file open at a time, one tensor
    in memory at a time. Returns the weight map."""
    bar = tqdm(total=sum(e.nbytes for g in shards for e in g), unit="B", unit_scale=True, desc="pp_to_hg",
               disable=quiet)
    current: list = [None, None]  # (layer index, its state)

    def tensor(e: _Entry) -> torch.Tensor:
        if e.idx is None:
            return extras[e.local]
        if current[0] != e.idx:
            current[:] = [e.idx, None]  # drop the previous layer's mapping first
            current[1] = load_state(e.idx)
        t = current[1][e.local]
        return t.to(e.dtype) if t.dtype != e.dtype else t

    stem, ext, index_name = (("pytorch_model", "bin", "pytorch_model.bin.index.json") if layout == "bin"
                             else ("model", "safetensors", "model.safetensors.index.json"))
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, group in enumerate(shards):
        final = os.path.join(tmp, f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}")
        if layout == "bin":
            torch.save({e.key: _own_copy(tensor(e), None) for e in group}, final)
            bar.update(sum(e.nbytes for e in group))
        else:
            _write_safetensors(final, group, tensor, bar)
        total_size += os.path.getsize(final)
        weight_map.update((e.key, os.path.basename(final)) for e in group)
    current[:] = [None, None]
    bar.close()
    with open(os.path.join(tmp, index_name), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
                  f, indent=2)
    return weight_map


def _layer_loader(layers_dir: str, adapter: dict | None):
    """idx -> layer state; for an adapter checkpoint, base weights with W + (alpha/r) B A merged in."""
    def plain(idx: int) -> dict:
        return torch.load(layer_file(layers_dir, idx), map_location="cpu", weights_only=True, mmap=True)
    if adapter is None:
        return plain
    base_dir = adapter["base_model_path"]
    if not os.path.isfile(layer_file(base_dir, 0)):
        raise ConversionError(f"{layers_dir} holds LoRA adapters for the base model {base_dir}, "
                              f"which is not there; restore it or edit {os.path.join(layers_dir, LORA_META_FILE)}")
    scaling = adapter["lora"]["alpha"] / adapter["lora"]["r"]

    def merged(idx: int) -> dict:
        base = dict(torch.load(layer_file(base_dir, idx), map_location="cpu", weights_only=True, mmap=True))
        extra = plain(idx) if os.path.isfile(layer_file(layers_dir, idx)) else {}
        return lora_mod.merge_into(base, extra, scaling)
    return merged


def _stage_hint(layers_dir: str, missing: list[str]) -> str:
    plan = os.path.join(layers_dir, PARTITION_FILE)
    if not os.path.isfile(plan):
        return ""
    with open(plan) as f:
        info = json.load(f)
    bounds = info["bounds"]
    lines = []
    for path in missing:
        idx = layer_index(path)
        stage = next(s for s in range(len(bounds) - 1) if bounds[s] <= idx < bounds[s + 1])
        lines.append(f"  {os.path.basename(path)} was written by pipeline stage {stage} "
                     f"(global ranks {info['stage_ranks'][stage]})")
    return ("\nThese files are written on the node that runs their stage; copy them into "
            f"{layers_dir} from that node:\n" + "\n".join(lines))


def export_peft(layers_dir: str, config_dir: str, save_path: str, meta: dict, force: bool,
                base_hf: str | None = None, quiet: bool = True) -> dict:
    """adapter_model.safetensors + adapter_config.json in PEFT's layout, keyed by HF module names;
    ``base_model_name_or_path`` is the absolute path of an HF export of the base (pipeline folders
    do not load in transformers): ``base_hf`` when it holds one (checked against the adapter's
    config), else the base is exported there (default ``save_path/base``)."""
    from safetensors.torch import save_file
    cfg = read_config(config_dir)
    family = get_family(cfg["model_type"])
    margs = family.parse_config(cfg)
    if base_hf and os.path.isfile(os.path.join(base_hf, "config.json")):
        base_cfg = read_config(base_hf)
        if (base_cfg.get("model_type") != cfg["model_type"]
                or family.expected_shapes(family.parse_config(base_cfg)) != family.expected_shapes(margs)):
            raise ConversionError(f"--base-hf {base_hf}: its config.json is not the adapter's base model "
                                  f"({meta['base_model_path']}); give the pp_to_hg export of that folder")
    keymap = family.key_map(margs)
    tensors: dict[str, torch.Tensor] = {}
    modules: set[str] = set()
    for idx in range(family.num_pipe_layers(margs)):
        path = layer_file(layers_dir, idx)
        if not os.path.isfile(path):
            continue
        state = torch.load(path, map_location="cpu", weights_only=True)
        slot = family.slot_of(margs, idx)
        for key, t in state.items():
            if not lora_mod.is_lora_key(key):
                continue
            hf = keymap.to_hf(f"{slot}.{key}")
            tensors[f"base_model.model.{hf}"] = t.contiguous()
            modules.add(hf.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1])
    if not tensors:
        raise ConversionError(f"{layers_dir}: no adapter tensors found")
    lora = meta["lora"]
    write_base = not (base_hf and os.path.isfile(os.path.join(base_hf, "config.json")))
    base_final = os.path.abspath(base_hf or os.path.join(save_path, "base"))
    with staged_output(save_path, force) as tmp:
        if write_base:  # inside the staged folder when it goes under save_path, so both appear together
            inside = os.path.commonpath([base_final, os.path.abspath(save_path)]) == os.path.abspath(save_path)
            where = os.path.join(tmp, os.path.relpath(base_final, os.path.abspath(save_path))) if inside else base_final
            pp_to_hg(meta["base_model_path"], where, quiet=quiet)
        save_file(tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora["r"], "lora_alpha": lora["alpha"],
                       "lora_dropout": lora["dropout"], "target_modules": sorted(modules), "bias": "none",
                       "fan_in_fan_out": False, "base_model_name_or_path": base_final,
                       "inference_mode": True}, f, indent=2)
    return {"tensors": len(tensors), "shards": 1}


_SIZE_UNITS = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
               "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5·10⁹ bytes and '2GiB' -> 2·2³⁰, as transformers and huggingface_hub read them."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().replace(" ", "")
    for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
        if t.endswith(unit) and t[: -len(unit)]:
            try:
                return int(float(t[: -len(unit)]) * _SIZE_UNITS[unit])
            except ValueError:
                break
    if t.isdigit():
        return int(t)
    raise ValueError(f"--max-shard-size {text!r}: give a number of bytes or a size such as 500MB, 5GB or 2GiB")
