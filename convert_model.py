"""Convert between Hugging Face checkpoints and ppllm pipeline layer files.

    python convert_model.py hg_to_pp --input-path HF_DIR --save-path PP_DIR [--dtype bf16]
    python convert_model.py pp_to_hg --input-path PP_DIR_OR_SAVE_PATH --save-path HF_DIR [--tag global_step100]

Both directions stream one tensor at a time and write into a temporary folder
that is renamed into place only when everything succeeded. The work is in ppllm/convert.py.
"""
from __future__ import annotations

import argparse
import sys

from ppllm import convert


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["hg_to_pp", "pp_to_hg"])
    p.add_argument("--input-path", required=True)
    p.add_argument("--save-path", required=True)
    p.add_argument("--dtype", choices=sorted(convert.DTYPES), default=None, help="cast floating tensors (default: keep)")
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
            convert.hg_to_pp(a.input_path, a.save_path, a.dtype, a.force, a.quiet)
        else:
            if a.merge_lora and a.lora_only:
                raise ValueError("--merge-lora and --lora-only exclude each other")
            if a.base_hf and not a.lora_only:
                raise ValueError("--base-hf goes with --lora-only")
            convert.pp_to_hg(a.input_path, a.save_path, a.tag, a.dtype, a.force, convert.parse_size(a.max_shard_size),
                             a.quiet, lora_only=a.lora_only, base_hf=a.base_hf)
    except (convert.ConversionError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"convert_model.py {a.mode}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
