"""Pipeline-parallel training on DeepSpeed.

    deepspeed --num_gpus 2 train_pp.py --config configs/ds_config_pp.yml
    python train_pp.py --config configs/ds_config_pp.yml --dry-run     # validate + print the plan
    deepspeed ... train_pp.py --config X --set max_steps=10 --set model_topo.parts=[3,3]

main() -> ppllm.train.main() -> setup() -> loop of engine.train_batch() (ppllm/train.py).
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (see configs/ds_config_pp.yml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted for nested keys); repeatable")
    p.add_argument("--dry-run", action="store_true", help="validate config, model and data; print the plan; exit")
    p.add_argument("--plan", action="store_true", help="print per-stage memory (weights, grads, optimizer, "
                   "activations) and a proposed partition; exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar; errors and the final line only")
    p.add_argument("--show-samples", type=int, default=0, metavar="N",
                   help="with the dry run: print N encoded samples with the trained spans marked «…»")
    p.add_argument("--help-config", action="store_true", help="describe every config key and exit")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the launcher
    a = p.parse_args(argv)
    if not a.help_config and not a.config:
        p.error("--config is required")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.help_config:
        from ppllm.config import describe_config
        print(describe_config())
        return 0
    from ppllm import train
    return train.main(a.config, a.set, dry=a.dry_run, plan=a.plan, quiet=a.quiet, show_samples=a.show_samples)


if __name__ == "__main__":
    sys.exit(main())
