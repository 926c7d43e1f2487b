"""Convert between Hugging Face checkpoints and ppllm pipeline layer files.

    python convert_model.py hg_to_pp --input-path HF_DIR --save-path PP_DIR [--dtype bf16]
    python convert_model.py pp_to_hg --input-path PP_DIR_OR_SAVE_PATH --save-path HF_DIR [--tag global_step100]

Both directions stream one tensor at a time and write into a temporary folder
that is renamed into place only when everything succeeded. The work is in ppllm/convert.py.
"""
from __future__ import annotations

import argparse
import errno
import sys

from ppllm import convert
from ppllm.errors import UserError
from ppllm.paths import Terminated


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


if __name__ == "__main__":
    sys.exit(main())
