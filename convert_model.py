"""Convert between Hugging Face checkpoints and ppllm pipeline layer files.

    python convert_model.py hg_to_pp --input-path HF_DIR --save-path PP_DIR [--dtype bf16]
    python convert_model.py pp_to_hg --input-path PP_DIR_OR_SAVE_PATH --save-path HF_DIR [--tag global_step100]

Both directions stream one tensor at a time and write into a temporary folder
that is renamed into place only when everything succeeded.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections import OrderedDict
from typing import Iterator

import torch
from tqdm import tqdm

from models import get_family, read_config
from models.pipeline import layer_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
META_FILE = "ppllm.json"
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


def _copy_side_files(src: str, dst: str) -> list[str]:
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not os.path.isfile(path) or name.endswith(WEIGHT_SUFFIXES) or name in WEIGHT_INDEXES:
            continue
        if name.startswith(("layer_", "mp_rank_", "ppllm")) or name == "latest":
            continue
        shutil.copy2(path, os.path.join(dst, name))
        copied.append(name)
    return copied


def _prepare_output(save_path: str, force: bool) -> str:
    if os.path.exists(save_path) and (not os.path.isdir(save_path) or os.listdir(save_path)) and not force:
        raise ConversionError(f"{save_path} exists and is not empty; pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(save_path))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=".convert-", dir=parent)


def _commit_output(tmp: str, save_path: str) -> None:
    if os.path.exists(save_path):
        shutil.rmtree(save_path)
    os.replace(tmp, save_path)


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
    tmp = _prepare_output(save_path, force)
    pending: dict[int, dict[str, torch.Tensor]] = {}
    done: set[int] = set()
    seen: dict[int, set[str]] = {}
    problems: list[str] = []
    try:
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
        copied = _copy_side_files(input_path, tmp)
        meta = {"format": "ppllm-pipeline", "family": family.name, "model_type": cfg["model_type"],
                "num_pipe_layers": family.num_pipe_layers(args), "source_layout": kind,
                "dtype": dtype or "as-source", "layer_names": family.layer_names(args)}
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        _commit_output(tmp, save_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        print(f"hg_to_pp: wrote {len(done)} layer files and {len(copied)} side files to {save_path}")
    return meta


# ---------------------------------------------------------------------------------------
# writing HF checkpoints


def resolve_pipeline_dir(input_path: str, tag: str | None = None) -> tuple[str, str]:
    """(folder with the layer files, folder with config.json) for a pp folder or a training save_path."""
    if tag:
        layers = os.path.join(input_path, tag)
        if not os.path.isdir(layers):
            raise ConversionError(f"{layers} does not exist (tag {tag!r} not found in {input_path})")
    elif os.path.isfile(os.path.join(input_path, "latest")):
        with open(os.path.join(input_path, "latest")) as f:
            latest = f.read().strip()
        layers = os.path.join(input_path, latest)
        if not os.path.isdir(layers):
            raise ConversionError(f"{input_path}/latest points to {latest!r}, which does not exist")
    else:
        layers = input_path
    for cand in (layers, input_path):
        if os.path.isfile(os.path.join(cand, "config.json")):
            return layers, cand
    raise ConversionError(f"no config.json in {layers} or {input_path}")


def pp_to_hg(input_path: str, save_path: str, tag: str | None = None, dtype: str | None = None,
             force: bool = False, max_shard_bytes: int = 2 << 30, quiet: bool = False,
             lora_only: bool = False) -> dict:
    """HF checkpoint from a pipeline folder or training save_path. An adapter (LoRA) checkpoint is
    merged into its base weights, or with lora_only written as a PEFT adapter."""
    from safetensors.torch import save_file

    from ppllm import lora as lora_mod
    layers_dir, config_dir = resolve_pipeline_dir(input_path, tag)
    adapter = lora_mod.read_meta(layers_dir)
    if lora_only:
        if adapter is None:
            raise ConversionError(f"{layers_dir} holds no LoRA adapters (no {lora_mod.ADAPTER_META})")
        return lora_mod.export_peft(layers_dir, config_dir, save_path, adapter, force)
    load_state = _layer_loader(layers_dir, adapter)
    cfg = read_config(config_dir)
    family = get_family(cfg["model_type"])
    args = family.parse_config(cfg)
    keymap = family.key_map(args)
    expected = family.expected_shapes(args)
    torch_dtype = DTYPES[dtype] if dtype else None

    missing = [layer_file(layers_dir, i) for i in sorted(expected)
               if not os.path.isfile(layer_file(layers_dir, i))
               and not (adapter and os.path.isfile(layer_file(adapter["base_model_path"], i)))]
    if missing:
        raise ConversionError(f"{layers_dir}: {len(missing)} layer file(s) missing:\n  " + "\n  ".join(missing)
                              + _stage_hint(layers_dir, missing))
    tmp = _prepare_output(save_path, force)
    try:
        shards: list[tuple[str, list[str]]] = []
        buf: dict[str, torch.Tensor] = {}
        buf_bytes = 0
        weight_map: dict[str, str] = {}
        total = sum(os.path.getsize(layer_file(layers_dir, i)) for i in expected)

        layout = family.export_layout(args)  # the family's original file layout
        first_dtype: list[torch.dtype] = []

        def flush():
            nonlocal buf, buf_bytes
            if not buf:
                return
            name = f"shard-{len(shards):05d}.tmp"
            if layout == "bin":
                torch.save(buf, os.path.join(tmp, name))
            else:
                save_file(buf, os.path.join(tmp, name), metadata={"format": "pt"})
            shards.append((name, list(buf)))
            buf, buf_bytes = {}, 0

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="pp_to_hg", disable=quiet)
        problems: list[str] = []
        for idx in sorted(expected):
            path = layer_file(layers_dir, idx)
            state = load_state(idx)
            want = expected[idx]
            extra = sorted(set(state) - set(want))
            lacking = sorted(set(want) - set(state))
            if extra or lacking:
                problems.append(f"{path}: missing {lacking}, unexpected {extra}")
                continue
            slot = family.slot_of(args, idx)
            for local in want:
                t = state[local]
                if tuple(t.shape) != tuple(want[local]):
                    problems.append(f"{path}: {local} has shape {list(t.shape)}, config implies {list(want[local])}")
                    continue
                hf_key = keymap.to_hf(f"{slot}.{local}")
                t = _own_copy(t, torch_dtype)
                if not first_dtype:
                    first_dtype.append(t.dtype)
                nbytes = t.numel() * t.element_size()
                if buf and buf_bytes + nbytes > max_shard_bytes:
                    flush()
                buf[hf_key] = t
                buf_bytes += nbytes
            bar.update(os.path.getsize(path))
            del state
        for key, t in family.export_extra(args, first_dtype[0] if first_dtype else torch.float32).items():
            buf[key] = t
        bar.close()
        if problems:
            raise ConversionError(f"{layers_dir}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
        flush()
        n = len(shards)
        total_size = 0
        stem, ext, index_name = (("pytorch_model", "bin", "pytorch_model.bin.index.json") if layout == "bin"
                                 else ("model", "safetensors", "model.safetensors.index.json"))
        for i, (tmp_name, keys) in enumerate(shards):
            final = f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}"
            os.replace(os.path.join(tmp, tmp_name), os.path.join(tmp, final))
            total_size += os.path.getsize(os.path.join(tmp, final))
            for k in keys:
                weight_map[k] = final
        with open(os.path.join(tmp, index_name), "w") as f:
            json.dump({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
                      f, indent=2)
        copied = _copy_side_files(config_dir, tmp)
        if layers_dir != config_dir:
            copied += _copy_side_files(layers_dir, tmp)
        _commit_output(tmp, save_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        print(f"pp_to_hg: wrote {len(weight_map)} tensors in {n} shard(s) and {len(copied)} side files to {save_path}")
    return {"tensors": len(weight_map), "shards": n}


def _layer_loader(layers_dir: str, adapter: dict | None):
    """idx -> layer state; for an adapter checkpoint, base weights with W + (alpha/r) B A merged in."""
    def plain(idx: int) -> dict:
        return torch.load(layer_file(layers_dir, idx), map_location="cpu", weights_only=True, mmap=True)
    if adapter is None:
        return plain
    base_dir = adapter["base_model_path"]
    if not os.path.isfile(layer_file(base_dir, 0)):
        raise ConversionError(f"{layers_dir} holds LoRA adapters for the base model {base_dir}, "
                              f"which is not there; restore it or edit {os.path.join(layers_dir, 'ppllm_lora.json')}")
    from ppllm.lora import merge_into
    scaling = adapter["lora"]["alpha"] / adapter["lora"]["r"]

    def merged(idx: int) -> dict:
        base = dict(torch.load(layer_file(base_dir, idx), map_location="cpu", weights_only=True, mmap=True))
        extra = plain(idx) if os.path.isfile(layer_file(layers_dir, idx)) else {}
        return merge_into(base, extra, scaling)
    return merged


def _stage_hint(layers_dir: str, missing: list[str]) -> str:
    plan = os.path.join(layers_dir, "ppllm_partition.json")
    if not os.path.isfile(plan):
        return ""
    with open(plan) as f:
        info = json.load(f)
    bounds = info["bounds"]
    lines = []
    for path in missing:
        idx = int(os.path.basename(path).split("_")[1].split("-")[0])
        stage = next(s for s in range(len(bounds) - 1) if bounds[s] <= idx < bounds[s + 1])
        lines.append(f"  {os.path.basename(path)} was written by pipeline stage {stage} "
                     f"(global ranks {info['stage_ranks'][stage]})")
    return ("\nThese files are written on the node that runs their stage; copy them into "
            f"{layers_dir} from that node:\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["hg_to_pp", "pp_to_hg"])
    p.add_argument("--input-path", required=True)
    p.add_argument("--save-path", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors (default: keep)")
    p.add_argument("--tag", default=None, help="pp_to_hg: checkpoint tag inside a training save_path (default: latest)")
    p.add_argument("--max-shard-size", default="2GB", help="pp_to_hg: shard size, e.g. 500MB, 5GB")
    p.add_argument("--force", action="store_true", help="replace a non-empty --save-path")
    p.add_argument("--merge-lora", action="store_true",
                   help="pp_to_hg of a LoRA checkpoint: merged full weights (the default for adapter checkpoints)")
    p.add_argument("--lora-only", action="store_true",
                   help="pp_to_hg of a LoRA checkpoint: PEFT adapter_model.safetensors + adapter_config.json")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        if a.mode == "hg_to_pp":
            hg_to_pp(a.input_path, a.save_path, a.dtype, a.force, a.quiet)
        else:
            if a.merge_lora and a.lora_only:
                raise ValueError("--merge-lora and --lora-only exclude each other")
            pp_to_hg(a.input_path, a.save_path, a.tag, a.dtype, a.force, _parse_size(a.max_shard_size), a.quiet,
                     lora_only=a.lora_only)
    except (ConversionError, FileNotFoundError, ValueError) as e:
        print(f"convert_model.py {a.mode}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _parse_size(text: str) -> int:
    t = text.strip().upper()
    for unit, mult in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


if __name__ == "__main__":
    sys.exit(main())
