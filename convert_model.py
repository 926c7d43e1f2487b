"""Convert between Hugging Face checkpoints and ppllm pipeline layer files.

    python convert_model.py hg_to_pp --input-path HF_DIR --save-path PP_DIR [--dtype bf16]
    python convert_model.py pp_to_hg --input-path PP_DIR_OR_SAVE_PATH --save-path HF_DIR [--tag global_step100]

Both directions stream one tensor at a time and write into a temporary folder
that is renamed into place only when everything succeeded. The work is in ppllm/convert.py.
"""
from __future__ import annotations

import sys

from ppllm.convert import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
