"""Prepare a run's data ahead of training, once for the whole cluster.

    python -m ppllm.prepare --config C                    # every training and eval file, here
    python -m ppllm.prepare --config C --share 3/16       # machine 3 of 16 takes its share of the files

Writes the same cache entries the launch (and the dry run) would, into ``cache_dir`` (default
``.ppllm-cache`` beside each file). Run one command per machine with ``--share K/N`` and the same
config: the files are dealt to the N shares by size (largest first, each to the share with the
fewest bytes so far), so the shares are disjoint and every machine computes the same split. With
``cache_dir`` on a shared filesystem, every rank of the launch then memory-maps the entries and no
node tokenizes what another has prepared. Concurrent preparers of one file (two shares given the
same K, a launch started meanwhile) never corrupt or duplicate an entry: each stages its own folder
and publishes it by an atomic rename; the later one uses the entry already there.

Prints progress (share done, MB/s, tokens/s, ETA) while it works and exits 2 with one line per
problem when a file cannot be read, or when ``strict: true`` and a file has bad samples (the launch
would stop on them; the entries are written all the same).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from ppllm.errors import UserError


def parse_share(text: str) -> tuple[int, int]:
    """``K/N`` -> (K, N) with 0 <= K < N."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--share {text!r}: expected K/N, e.g. 0/4 for the first of four machines") from None
    if n < 1 or not 0 <= k < n:
        raise UserError(f"--share {text!r}: K must be 0..N-1 (machines are numbered from 0), e.g. --share 0/{max(n, 1)}")
    return k, n


def share_files(files: list, sizes: list[int], k: int, n: int) -> list[int]:
    """Indices of the files of share k of n: largest first, each to the share with the fewest bytes so
    far (ties: the lower share); deterministic, so every machine computes the same split."""
    load = [0] * n
    owner = {}
    for i in sorted(range(len(files)), key=lambda i: (-sizes[i], str(files[i]))):
        s = min(range(n), key=lambda j: (load[j], j))
        owner[i] = s
        load[s] += sizes[i]
    return [i for i in range(len(files)) if owner[i] == k]


def run(config: str, overrides: list[str], share: str = "0/1", workers: int | None = None) -> int:
    from data.dataset import DataError, prepare_file
    from ppllm.config import ConfigError, expand_data_paths, load_config
    from ppllm.feed import _tokenizer_template
    try:
        k, n = parse_share(share)
        cfg = load_config(config, overrides, world_size=None)
        from models import load_family
        _, margs = load_family(cfg.run.model_path)
        _, template = _tokenizer_template(cfg, margs.model_type)
    except (ConfigError, UserError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", flush=True)
        return 2
    entries, seen = [], set()
    files = list(zip(cfg.data_files(), cfg.data_fields()))
    if cfg.run.eval_data_path:
        files += list(zip(expand_data_paths(cfg.run.eval_data_path), cfg.data_fields(eval_data=True)))
    for path, fields in files:
        key = (os.path.abspath(path), repr(sorted((fields or {}).items())))
        if key not in seen:
            seen.add(key)
            entries.append((path, fields))
    sizes = [os.path.getsize(p) for p, _ in entries]
    mine = share_files(entries, sizes, k, n)
    total = sum(sizes[i] for i in mine)
    where = cfg.run.cache_dir or ".ppllm-cache beside each file"
    print(f"prepare: share {k}/{n}: {len(mine)} of {len(entries)} file(s), {total / 1e6:.1f} MB; cache {where}",
          flush=True)
    t0, done, tokens, bad, listed, made = time.monotonic(), 0, 0, 0, [], 0
    for j, i in enumerate(mine, 1):
        path, fields = entries[i]
        try:
            src = prepare_file(path, template, cfg.run.max_seq_len, cfg.run.overlong, progress=True, workers=workers,
                               fields=fields, cache_dir=cfg.run.cache_dir)
        except DataError as e:
            print(f"error: {e}", flush=True)
            return 2
        made += src.meta.get("prepared_by", {}).get("pid") == os.getpid()
        done += sizes[i]
        tokens += src.meta["tokens"]
        bad += src.meta["n_errors"]
        listed += src.meta["errors"][:20 - len(listed)]
        dt = max(time.monotonic() - t0, 1e-9)
        eta = (total - done) / (done / dt) if done else 0.0
        print(f"prepare: {j}/{len(mine)} file(s), {done / 1e6:.1f} of {total / 1e6:.1f} MB, {done / dt / 1e6:.1f} MB/s, "
              f"{tokens / dt / 1e3:.1f}k tokens/s, ETA {int(eta) // 60}m{int(eta) % 60:02d}s", flush=True)
    print(f"prepare: share {k}/{n} done: {len(mine)} file(s) ({made} prepared here, {len(mine) - made} already in "
          f"the cache), {tokens} tokens in {time.monotonic() - t0:.1f} s", flush=True)
    if bad:
        head = f"{bad} bad sample(s) in share {k}/{n}"
        if cfg.run.strict:
            print(f"error: {head} (strict: true: the launch stops on them; strict: false skips them and counts them "
                  f"per reason):\n" + "\n".join(f"  {e}" for e in listed), flush=True)
            return 2
        print(f"prepare: {head}, skipped at launch (strict: false)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ppllm.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--share", default="0/1", help="K/N: this machine's share of the files (machines numbered from 0)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: every core)")
    a = ap.parse_args(argv)
    return run(a.config, a.set, a.share, a.workers)


if __name__ == "__main__":
    sys.exit(main())
