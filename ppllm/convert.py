"""Conversion between Hugging Face checkpoints and ppllm pipeline layer files.

``hg_to_pp`` maps every HF tensor through the family's declarative key map into per-layer
files; ``pp_to_hg`` inverts the same map and streams the tensors into the family's original
file layout. Both stream one tensor at a time and write into a staged folder that replaces
the output only when everything succeeded (``ppllm.paths.staged_output``).
The command line is ``convert_model.py`` (:func:`main`): every user error is one line naming the
file and the fix, with exit status 2.
"""
from __future__ import annotations

import errno
import json
import os
import sys
from collections import OrderedDict
from typing import Iterator

import torch
from tqdm import tqdm

from models import get_family
from ppllm import tensor_io as tio
from ppllm.errors import UserError
from ppllm.paths import (LORA_META_FILE, META_FILE, PARTITION_FILE, Terminated, copy_side_files, latest_target,
                         layer_file, layer_index, list_tags, staged_output)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class ConversionError(UserError):
    """A conversion that cannot be done as asked; the message names the file and the fix."""


def _read_json(path: str, fix: str) -> dict:
    """A JSON object from ``path``; a ConversionError naming the file and ``fix`` when it is not one."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConversionError(f"{path}: not UTF-8 text (byte {e.start}); {fix}") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); {fix}") from None
    except OSError as e:
        raise ConversionError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: a JSON {type(data).__name__}, not an object; {fix}")
    return data


def model_of(folder: str):
    """(config, family, parsed args) of a model folder; a ConversionError naming config.json when the
    family cannot read it."""
    cfg = read_model_config(folder)
    try:
        family = get_family(cfg["model_type"])
    except ValueError as e:
        raise ConversionError(f"{os.path.join(folder, 'config.json')}: {e}") from None
    try:
        return cfg, family, family.parse_config(cfg)
    except Exception as e:  # noqa: BLE001 - parsing a config: any failure is the file's (transformers' own checks too)
        reason = f"missing key {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:160]
        raise ConversionError(f"{os.path.join(folder, 'config.json')}: not a usable {cfg['model_type']} config "
                              f"({reason}); restore config.json from the original model") from None


def read_model_config(folder: str) -> dict:
    """config.json of a model folder, checked: JSON, an object, with a model_type."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{path} not found: a model folder needs the HF config.json")
    cfg = _read_json(path, "restore config.json from the original model")
    if not isinstance(cfg.get("model_type"), str):
        raise ConversionError(f"{path}: no 'model_type' key; restore config.json from the original model")
    return cfg


# ---------------------------------------------------------------------------------------
# reading HF checkpoints


def hf_weight_files(folder: str) -> tuple[list[str], str]:
    """Weight files of a HF folder in index order, and their kind ('safetensors' or 'bin')."""
    for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            weight_map = _read_json(index, "restore the index file from the original model").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConversionError(f"{index}: no 'weight_map' of tensor names to file names; restore the index "
                                      f"from the original model")
            files = list(OrderedDict.fromkeys(weight_map.values()))
            missing = [n for n in files if not os.path.isfile(os.path.join(folder, n))]
            if missing:
                raise ConversionError(f"{index} names shard(s) that are not there: {', '.join(missing)}")
            return [os.path.join(folder, n) for n in sorted(files)], kind
    for name, kind in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)], kind
    raise ConversionError(f"{folder}: no model.safetensors, pytorch_model.bin or index file found")


def hf_tensor_index(files: list[str], kind: str) -> Iterator[tuple[str, object]]:
    """(key, payload) of every tensor, in file order, from the files' headers: byte ranges
    (tensor_io.Stored) where the format allows, else tensors that torch loads when written."""
    for path in files:
        try:
            index = tio.safetensors_index(path) if kind == "safetensors" else tio.torch_zip_index(path)
        except tio.DamagedFile as e:
            raise ConversionError(f"{e}; the file is damaged or incomplete: download or copy it again") from None
        if index is not None:
            yield from index.items()
            continue
        # a legacy (non-zip) or unusual .bin: torch reads it, one file held at a time
        state = _torch_load_state(path, "download or copy it again")
        for key, t in state.items():
            yield key, tio.Lazy(t.dtype, tuple(t.shape), lambda path=path, key=key: _TorchFiles.get(path)[key])
        del state


class _TorchFiles:
    """The one torch-loaded source file kept open at a time (the fallback path of hg_to_pp)."""
    _path: str | None = None
    _state: dict | None = None

    @classmethod
    def get(cls, path: str) -> dict:
        if cls._path != path:
            cls._path, cls._state = None, None
            cls._state = _torch_load_state(path, "restore it")
            cls._path = path
        return cls._state

    @classmethod
    def close(cls) -> None:
        cls._path, cls._state = None, None


def _torch_load_state(path: str, fix: str) -> dict:
    """{name: tensor} of a torch file read by torch (weights only); a ConversionError naming the file."""
    import zipfile
    with open(path, "rb") as f:
        magic = f.read(2)
    if not zipfile.is_zipfile(path) and magic[:1] != b"\x80":  # neither torch's zip nor its legacy pickle
        raise ConversionError(f"{path}: not a torch file (no zip archive: truncated, or another format); {fix}")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch reports a damaged file in many ways
        reason = " ".join(str(e).split()).split(". ")[0][:120] or type(e).__name__
        raise ConversionError(f"{path}: not a readable tensor file ({type(e).__name__}: {reason}); {fix}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                              for k, t in state.items()):
        raise ConversionError(f"{path}: holds a {type(state).__name__}, not a {{name: tensor}} state dict; {fix}")
    return state


def _cast(p, dtype: torch.dtype | None):
    """The payload as written: cast to ``dtype`` (floating tensors only) when asked."""
    if dtype is None or not p.dtype.is_floating_point or p.dtype == dtype:
        return p
    load = p.load if isinstance(p, tio.Stored) else p.make
    return tio.Lazy(dtype, tuple(p.shape), lambda: load().to(dtype))


def hg_to_pp(input_path: str, save_path: str, dtype: str | None = None, force: bool = False,
             quiet: bool = False) -> dict:
    if not os.path.isdir(input_path):
        raise ConversionError(f"--input-path {input_path}: " + ("a file; give the Hugging Face model folder that "
                              "holds it" if os.path.exists(input_path) else "no such folder"))
    cfg, family, args = model_of(input_path)
    keymap = family.key_map(args)
    expected = family.expected_shapes(args)
    files, kind = hf_weight_files(input_path)
    torch_dtype = DTYPES[dtype] if dtype else None

    # plan every layer file from the headers (no tensor data is read), then copy
    plan: dict[int, dict[str, object]] = {}
    problems: list[str] = []
    for key, payload in hf_tensor_index(files, kind):
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
        if tuple(payload.shape) != tuple(want):
            problems.append(f"{key}: shape {list(payload.shape)} but the config implies {list(want)}")
            continue
        plan.setdefault(idx, {})[local] = _cast(payload, torch_dtype)
    for idx, keys in expected.items():
        for local in keys:
            if local not in plan.get(idx, {}):
                problems.append(f"missing key {keymap.to_hf(family.slot_of(args, idx) + '.' + local)!r}")
    if problems:
        raise ConversionError(f"{input_path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))

    with staged_output(save_path, force, inputs=[input_path]) as tmp:
        total = sum(tio.payload_meta(p)[2] for layer in plan.values() for p in layer.values())
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="hg_to_pp", disable=quiet)
        for idx in sorted(expected):
            items = [(local, plan[idx][local]) for local in expected[idx]]
            tio.write_torch_state(layer_file(tmp, idx), items)
            bar.update(sum(tio.payload_meta(p)[2] for _, p in items))
        bar.close()
        _TorchFiles.close()
        copied = copy_side_files(input_path, tmp)
        meta = {"format": "ppllm-pipeline", "family": family.name, "model_type": cfg["model_type"],
                "num_pipe_layers": family.num_pipe_layers(args), "source_layout": kind,
                "dtype": dtype or "as-source", "layer_names": family.layer_names(args)}
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
    if not quiet:
        print(f"hg_to_pp: wrote {len(expected)} layer files and {len(copied)} side files to {save_path}")
    return meta


# ---------------------------------------------------------------------------------------
# writing HF checkpoints


def resolve_pipeline_dir(input_path: str, tag: str | None = None) -> tuple[str, str]:
    """(folder with the layer files, folder with config.json) for a pp folder or a training save_path."""
    if not os.path.isdir(input_path):
        what = "is a file, not a folder" if os.path.exists(input_path) else "does not exist"
        raise ConversionError(f"{input_path} {what} (expected a pipeline folder from hg_to_pp, "
                              f"or a training save_path)")
    tags = list_tags(input_path)
    if tag:
        layers = os.path.join(input_path, tag)
        if not os.path.isdir(layers):
            have = f"tags there: {', '.join(tags)}" if tags else "it holds no checkpoint tags"
            raise ConversionError(f"tag {tag!r} not found in {input_path}; {have}")
    elif (latest := _latest_tag(input_path, tags)) is not None:
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


def _latest_tag(input_path: str, tags: list[str]) -> str | None:
    """What input_path/latest names (None without one); a ConversionError when it is not text."""
    try:
        return latest_target(input_path)
    except (UnicodeDecodeError, OSError) as e:
        raise ConversionError(f"{os.path.join(input_path, 'latest')} cannot be read as a tag name "
                              f"({type(e).__name__}); name the checkpoint with --tag"
                              + (f" (tags there: {', '.join(tags)})" if tags else "")) from None


class _Entry:
    """One output tensor of pp_to_hg: its HF name and its payload (bytes in a layer file, or a
    tensor made when it is written)."""
    __slots__ = ("key", "payload", "nbytes")

    def __init__(self, key: str, payload):
        self.key, self.payload = key, payload
        self.nbytes = tio.payload_meta(payload)[2]


def pp_to_hg(input_path: str, save_path: str, tag: str | None = None, dtype: str | None = None,
             force: bool = False, max_shard_bytes: int = 2 * 10 ** 9, quiet: bool = False,
             lora_only: bool = False, base_hf: str | None = None) -> dict:
    """HF checkpoint from a pipeline folder or training save_path. An adapter (LoRA) checkpoint is
    merged into its base weights, or with lora_only written as a PEFT adapter whose base is the HF
    export ``base_hf`` (written there when it does not exist yet; default ``save_path/base``)."""
    layers_dir, config_dir = resolve_pipeline_dir(input_path, tag)
    adapter = _read_adapter_meta(layers_dir)
    if lora_only:
        if adapter is None:
            raise ConversionError(f"{layers_dir} holds no LoRA adapters (no {LORA_META_FILE})")
        return export_peft(layers_dir, config_dir, save_path, adapter, force, base_hf, quiet)
    cfg, family, args = model_of(config_dir)
    entries = _plan_export(family, args, layers_dir, adapter, DTYPES[dtype] if dtype else None)
    layout = family.export_layout(args)  # the family's original file layout
    inputs = [input_path, layers_dir, config_dir] + ([adapter["base_model_path"]] if adapter else [])
    with staged_output(save_path, force, inputs=inputs) as tmp:
        weight_map = _write_shards(tmp, _group_shards(entries, max_shard_bytes), layout, quiet)
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


def _read_adapter_meta(layers_dir: str) -> dict | None:
    path = os.path.join(layers_dir, LORA_META_FILE)
    if not os.path.isfile(path):
        return None  # the common case: a full checkpoint
    meta = _read_json(path, "restore it from the training run")
    lora = meta.get("lora")
    if not isinstance(meta.get("base_model_path"), str) or not isinstance(lora, dict) or not all(
            isinstance(lora.get(k), (int, float)) and not isinstance(lora.get(k), bool) for k in ("r", "alpha")):
        raise ConversionError(f"{path}: needs base_model_path and lora.r / lora.alpha; restore it from the training "
                              f"run")
    return meta


def _layer_index(path: str) -> dict[str, object]:
    """{local key: payload} of a layer file: byte ranges when it is a plain torch file."""
    fix = ("copy it again from the training run, or convert the model again with hg_to_pp; a layer file comes from "
           "ppllm (hg_to_pp or a checkpoint)")
    try:
        index = tio.torch_zip_index(path)
    except tio.DamagedFile as e:
        raise ConversionError(f"{e}; {fix}") from None
    if index is not None:
        return index
    state = _torch_load_state(path, fix)
    return {k: tio.Lazy(t.dtype, tuple(t.shape), lambda path=path, k=k: _TorchFiles.get(path)[k])
            for k, t in state.items()}


def _plan_export(family, args, layers_dir: str, adapter: dict | None,
                 torch_dtype: torch.dtype | None) -> list[_Entry]:
    """Every output tensor, checked against the config from the layer files' headers alone (no
    tensor data is read), so the writer can stream each one straight into its shard. A LoRA merge
    keeps names, shapes and dtypes: it is planned from the base files and merged while writing."""
    keymap = family.key_map(args)
    expected = family.expected_shapes(args)
    base_dir = adapter["base_model_path"] if adapter else None
    missing = [layer_file(layers_dir, i) for i in sorted(expected)
               if not os.path.isfile(layer_file(layers_dir, i))
               and not (adapter and os.path.isfile(layer_file(base_dir, i)))]
    if missing:
        raise ConversionError(f"{layers_dir}: {len(missing)} layer file(s) missing:\n  " + "\n  ".join(missing)
                              + _stage_hint(layers_dir, missing))
    merged = _merged_loader(layers_dir, adapter) if adapter else None
    entries, problems = [], []
    out_dtype = None
    for idx in sorted(expected):
        path = layer_file(base_dir or layers_dir, idx)
        state = _layer_index(path)
        want = expected[idx]
        extra, lacking = sorted(set(state) - set(want)), sorted(set(want) - set(state))
        if extra or lacking:
            problems.append(f"{path}: missing {lacking}, unexpected {extra}")
            continue
        slot = family.slot_of(args, idx)
        for local in want:
            p = state[local]
            if tuple(p.shape) != tuple(want[local]):
                problems.append(f"{path}: {local} has shape {list(p.shape)}, config implies {list(want[local])}")
                continue
            if merged is not None:
                p = tio.Lazy(p.dtype, tuple(p.shape), lambda idx=idx, local=local: merged(idx)[local])
            p = _cast(p, torch_dtype)
            out_dtype = out_dtype or p.dtype
            entries.append(_Entry(keymap.to_hf(f"{slot}.{local}"), p))
    if problems:
        raise ConversionError(f"{layers_dir}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    extras = family.export_extra(args, out_dtype or torch.float32)
    return entries + [_Entry(k, t) for k, t in extras.items()]


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


def _write_shards(tmp: str, shards: list[list[_Entry]], layout: str, quiet: bool) -> dict[str, str]:
    """Write the shards with HF's names and their index, streaming every tensor from its layer
    file into the shard. Returns the weight map."""
    bar = tqdm(total=sum(e.nbytes for g in shards for e in g), unit="B", unit_scale=True, desc="pp_to_hg",
               disable=quiet)
    stem, ext, index_name = (("pytorch_model", "bin", "pytorch_model.bin.index.json") if layout == "bin"
                             else ("model", "safetensors", "model.safetensors.index.json"))
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, group in enumerate(shards):
        final = os.path.join(tmp, f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}")
        items = [(e.key, e.payload) for e in group]
        if layout == "bin":
            tio.write_torch_state(final, items)
        else:
            tio.write_safetensors(final, items)
        bar.update(sum(e.nbytes for e in group))
        total_size += sum(e.nbytes for e in group)
        weight_map.update((e.key, os.path.basename(final)) for e in group)
    _TorchFiles.close()
    bar.close()
    with open(os.path.join(tmp, index_name), "w") as f:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
                  f, indent=2)
    return weight_map


def _merged_loader(layers_dir: str, adapter: dict):
    """idx -> layer state with W + (alpha/r) B A merged in; the last layer's merge is kept."""
    from ppllm import lora
    base_dir = adapter["base_model_path"]
    if not os.path.isfile(layer_file(base_dir, 0)):
        raise ConversionError(f"{layers_dir} holds LoRA adapters for the base model {base_dir}, "
                              f"which is not there; restore it or edit {os.path.join(layers_dir, LORA_META_FILE)}")
    scaling = adapter["lora"]["alpha"] / adapter["lora"]["r"]
    cache: list = [None, None]

    def load(directory: str, idx: int) -> dict:
        return _torch_load_state(layer_file(directory, idx), "copy it again from the training run")

    def merged(idx: int) -> dict:
        if cache[0] != idx:
            cache[:] = [None, None]
            base = dict(load(base_dir, idx))
            extra = load(layers_dir, idx) if os.path.isfile(layer_file(layers_dir, idx)) else {}
            cache[:] = [idx, lora.merge_into(base, extra, scaling)]
        return cache[1]
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

    from ppllm import lora as lora_mod
    cfg, family, margs = model_of(config_dir)
    if base_hf and os.path.isfile(os.path.join(base_hf, "config.json")):
        base_cfg = read_model_config(base_hf)
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
        state = _torch_load_state(path, "copy it again from the training run")
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
    with staged_output(save_path, force, inputs=[layers_dir, config_dir, meta["base_model_path"]]) as tmp:
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


# ---------------------------------------------------------------------------------------
# the command line (convert_model.py)


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    """``convert_model.py``: the command line; user errors as one line and exit status 2."""
    import argparse
    p = argparse.ArgumentParser(prog="convert_model.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["hg_to_pp", "pp_to_hg"])
    p.add_argument("--input-path", required=True)
    p.add_argument("--save-path", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors (default: keep)")
    p.add_argument("--tag", default=None, help="pp_to_hg: checkpoint tag inside a training save_path (default: latest)")
    p.add_argument("--max-shard-size", default="2GB",
                   help="pp_to_hg: shard size; decimal units as in huggingface_hub (5GB = 5e9 bytes), or GiB/MiB")
    p.add_argument("--force", action="store_true", help="replace a non-empty --save-path")
    p.add_argument("--merge-lora", action="store_true",
                   help="pp_to_hg of a LoRA checkpoint: merged full weights (the default for adapter checkpoints)")
    p.add_argument("--lora-only", action="store_true",
                   help="pp_to_hg of a LoRA checkpoint: PEFT adapter_model.safetensors + adapter_config.json")
    p.add_argument("--base-hf", default=None, metavar="PATH",
                   help="--lora-only: the HF export of the base model that adapter_config.json names (written "
                        "there when PATH does not exist; default SAVE_PATH/base)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        if a.mode == "hg_to_pp":
            hg_to_pp(a.input_path, a.save_path, a.dtype, a.force, a.quiet)
        else:
            if a.merge_lora and a.lora_only:
                raise ValueError("--merge-lora and --lora-only exclude each other")
            if a.base_hf and not a.lora_only:
                raise ValueError("--base-hf goes with --lora-only")
            pp_to_hg(a.input_path, a.save_path, a.tag, a.dtype, a.force, parse_size(a.max_shard_size),
                     a.quiet, lora_only=a.lora_only, base_hf=a.base_hf)
    except (UserError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"convert_model.py {a.mode}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, a read-only or vanished folder: nothing was written (staging removed)
        print(f"convert_model.py {a.mode}: error: {os_error_message(e, a.save_path)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the staging folder is already removed
        print(f"convert_model.py {a.mode}: interrupted; nothing was written to {a.save_path}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    return 0


def os_error_message(e: OSError, save_path: str) -> str:
    """An OSError as one line: the file, what happened, what to do."""
    where = e.filename or save_path
    if e.errno == errno.ENOSPC:
        return (f"{where}: no space left on device; free space there or choose a --save-path on another disk "
                f"(nothing was written, the partial output is removed)")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{where}: {e.strerror}; choose a --save-path in a writable folder (nothing was written)"
    return f"{where}: {e.strerror or e}"
