"""What each rank feeds the engine: the validated, packed rows of a run and their step stream.

The first and last pipeline stage of every data-parallel replica read data (the engine pulls
inputs on the first stage and labels on the last); middle stages only learn the step counts.

The dry run and the launch go through the same functions here (``load_data``, ``load_eval``,
``count_steps``), so whatever stops a launch on data stops the dry run with the same message.
At launch, ``make_loaders`` runs in three agreed phases (``ppllm.errors.agree``: a failure on
any rank stops every rank, and rank 0 prints it once):

1. one rank per node prepares every file (tokenizes with all cores, writes the cache) while
   the node's other ranks wait; with a ``cache_dir`` on several nodes, each node first prepares
   its share of the files (``ppllm.prepare.share_files``), then what is still missing;
2. the data-reading ranks memory-map the prepared files and pack the rows;
3. every rank learns the row counts (and that the readers agree on them) and so the step counts.
"""
from __future__ import annotations

import os
import socket

import torch

from ppllm import collectives, errors
from ppllm.log import is_rank0


def _tokenizer_template(cfg, model_type: str):
    from data.templates import get_template
    from data.tokenizer import load_tokenizer
    tok = load_tokenizer(cfg.tokenizer_path, model_type)
    return tok, get_template(cfg.run.template, tok, model_type, system_prompt=cfg.run.system_prompt)


def _guard(what: str, fn):
    """Tokenizer/template problems (a missing folder, a template the tokenizer cannot render) are
    the user's to fix: report them as data errors, naming ``what``."""
    from data.dataset import DataError
    try:
        return fn()
    except DataError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise DataError(f"{what}: {e}") from e


def load_data(cfg, model_type: str, files: list[str] | None = None, progress: bool | None = None,
              fields: list | None = None):
    """(tokenizer, packed rows, stats) of the training data; every sample is validated first."""
    from data.dataset import build_rows, source_weights

    def go():
        tok, template = _tokenizer_template(cfg, model_type)
        training = files is None or files == cfg.data_files()
        paths = cfg.data_files() if files is None else files
        weights = source_weights(cfg.run.data_path, cfg.run.data_weights) if training else None
        rows, stats = build_rows(paths, template, cfg.run.max_seq_len, cfg.run.packing, cfg.run.overlong,
                                 cfg.run.seed, strict=cfg.run.strict, weights=weights,
                                 progress=is_rank0() if progress is None else progress,
                                 fields=cfg.data_fields() if files is None else fields, cache_dir=cfg.run.cache_dir)
        stats.template = template.name
        return tok, rows, stats
    return _guard("data", go)


def load_eval(cfg, model_type: str, progress: bool | None = None):
    """(rows, stats) of ``eval_data_path``, or (None, None); its errors say it is the eval set."""
    from data.dataset import DataError
    from ppllm.config import expand_data_paths
    if not cfg.run.eval_data_path:
        return None, None
    try:
        _, rows, stats = load_data(cfg, model_type, expand_data_paths(cfg.run.eval_data_path), progress,
                                   cfg.data_fields(eval_data=True))
    except DataError as e:
        raise DataError(f"eval data (eval_data_path): {e}") from e
    return rows, stats


def rows_per_step(cfg) -> int:
    return cfg.micro_batch * cfg.grad_accum * cfg.data


def count_steps(cfg, train_rows: int, eval_rows: int | None = None) -> tuple[int, int]:
    """(training steps, steps of one evaluation) for these row counts (see data.dataset.StepLoader)."""
    from data.dataset import total_steps
    per = rows_per_step(cfg)
    total = total_steps(train_rows, per, cfg.run.n_epoches, cfg.run.max_steps)
    return total, (total_steps(eval_rows, per, 1) if eval_rows else 0)


def format_data_stats(stats, label: str = "data") -> str:
    kinds = ", ".join(f"{k}={v}" for k, v in sorted(stats.samples.items()))
    template = f"template {stats.template}; " if getattr(stats, "template", None) else ""
    lines = [f"{label}: {sum(stats.samples.values())} samples ({kinds}) from {len(stats.sources)} file(s); {template}"
             f"{stats.tokens} tokens, {stats.trained_tokens} trained; {stats.windowed} pretraining document(s) "
             f"split into {stats.windows} windows, {stats.truncated} truncated, {stats.dropped} dropped; "
             f"{stats.rows} rows, packing efficiency {stats.efficiency:.1%} "
             f"(one sample per row would be {stats.padded_efficiency:.1%})"]
    if stats.skipped:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(stats.skipped.items()))
        lines.append(f"{label}: skipped {sum(stats.skipped.values())} bad sample(s) (strict: false): {reasons}")
    return "\n".join(lines)


def format_steps(cfg, train_rows: int, eval_rows: int | None, start: int = 0) -> str:
    from data.dataset import total_steps
    total, eval_steps = count_steps(cfg, train_rows, eval_rows)
    per = rows_per_step(cfg)
    capped = f", capped by max_steps {cfg.run.max_steps}" if total < total_steps(train_rows, per, cfg.run.n_epoches) \
        else ""
    text = (f"would train {total} optimizer steps: {cfg.run.n_epoches} pass(es) over {train_rows} rows at {per} rows per "
            f"step (micro batch {cfg.micro_batch} x gradient_accumulation_steps {cfg.grad_accum} x data "
            f"{cfg.data}){capped}")
    if start:
        text += f"; steps {start + 1}..{total} remain after the checkpoint to resume"
    if eval_rows:
        text += f"; evaluation: {eval_steps} step(s) over {eval_rows} rows"
    return text


class NoData:
    """Stand-in loader for middle stages: knows the step counts, holds no data."""
    has_data = False

    def __init__(self, steps_per_epoch: int, eval_steps: int = 0):
        self.steps_per_epoch = steps_per_epoch
        self.eval_steps = eval_steps

    def next_step(self):
        return None

    def one_pass(self):
        for _ in range(self.eval_steps):
            yield None

    def load_state_dict(self, state):
        pass

    def state_dict(self):
        return {}


def node_preparer(cfg, rank: int, hosts: list[str]) -> bool:
    """Is this rank the one that prepares the data on its node? The lowest data-reading rank among
    the ranks on the same host (``hosts[r]``: rank r's host name). Going by names, not by blocks
    of local ranks, keeps it right for every launcher's placement (SLURM's cyclic one too)."""
    from ppllm import ds_compat
    topo = ds_compat.topology(cfg.pipe, cfg.data)
    readers = [r for r in range(cfg.world_size) if topo.get_coord(r).pipe in (0, cfg.pipe - 1)]
    mine = [r for r in readers if hosts[r] == hosts[rank]]
    return bool(mine) and rank == mine[0]


def prepare_node(cfg, model_type: str, share: tuple[int, int] | None = None) -> None:
    """Tokenize and cache every training and eval file (a cache hit when already prepared); with
    ``share=(k, n)`` only the files of share k of n (``ppllm.prepare.share_files``)."""
    from data.dataset import DataError, load_sources
    from ppllm.config import expand_data_paths
    from ppllm.prepare import share_files

    def go(files, fields):
        if share is not None:
            mine = share_files(files, [os.path.getsize(f) for f in files], *share)
            files, fields = [files[i] for i in mine], [fields[i] for i in mine]
            if not files:
                return
        _, template = _tokenizer_template(cfg, model_type)
        load_sources(files, template, cfg.run.max_seq_len, cfg.run.overlong, strict=False, progress=True,
                     fields=fields, cache_dir=cfg.run.cache_dir)
    _guard("data", lambda: go(cfg.data_files(), cfg.data_fields()))
    if cfg.run.eval_data_path:
        try:
            _guard("data", lambda: go(expand_data_paths(cfg.run.eval_data_path), cfg.data_fields(eval_data=True)))
        except DataError as e:  # the message load_eval gives (the dry run's)
            raise DataError(f"eval data (eval_data_path): {e}") from e


def agreed_row_counts(mine: list[int]) -> list[int]:
    """[training rows, eval rows] that every data-reading rank found (``-1``s on a rank that reads
    no data); every rank learns them. Readers that disagree stop the run."""
    from data.dataset import DataError
    hi = collectives.all_reduce(mine, op="max", integer=True)
    lo = collectives.all_reduce([x if x >= 0 else 2 ** 62 for x in mine], op="min", integer=True)
    if hi != lo:
        raise DataError(f"the data-reading ranks see different data: between {lo[0]} and "
                        f"{hi[0]} training rows (eval: {lo[1]}..{hi[1]}); give every "
                        f"node the same data files (same content, same paths)")
    return hi


def make_loaders(cfg, model_type: str, has_data: bool, dp_rank: int, dp_size: int, announce: bool):
    """(training loader, eval loader or None, training steps), the same step counts on every rank.

    Every rank must call this (it runs collectives)."""
    from data.dataset import DataError, StepLoader
    rank = torch.distributed.get_rank()
    hosts = collectives.all_gather_object(socket.gethostname())
    preparer = node_preparer(cfg, rank, hosts)
    nodes = list(dict.fromkeys(hosts))  # host names in rank order: node k is nodes[k]
    if cfg.run.cache_dir and len(nodes) > 1:
        # a cache_dir shared by the nodes: each node first prepares its share of the files, so that
        # no node tokenizes what another prepares; then (below) what is still missing (a cache_dir
        # that is not shared after all: every node's own)
        share = (nodes.index(hosts[rank]), len(nodes))
        errors.agree(lambda: prepare_node(cfg, model_type, share) if preparer else None)
    errors.agree(lambda: prepare_node(cfg, model_type) if preparer else None)

    def build():
        if not has_data:
            return None, None
        tok, rows, stats = load_data(cfg, model_type, progress=False)
        eval_rows, eval_stats = load_eval(cfg, model_type, progress=False)
        if announce:
            print(format_data_stats(stats), flush=True)
            if eval_stats is not None:
                print(format_data_stats(eval_stats, "eval data"), flush=True)
        seed, pad = cfg.run.seed, tok.pad_id
        train = StepLoader(rows, cfg.micro_batch, cfg.grad_accum, dp_rank, dp_size, seed, pad)
        ev = StepLoader(eval_rows, cfg.micro_batch, cfg.grad_accum, dp_rank, dp_size, seed, pad) \
            if eval_rows is not None else None
        return train, ev
    loader, eval_loader = errors.agree(build)

    # every reader built the same rows from the same files; the others learn the counts
    mine = [loader.n, eval_loader.n if eval_loader is not None else 0] if has_data else [-1, -1]
    n_train, n_eval = agreed_row_counts(mine)
    total, eval_steps = count_steps(cfg, n_train, n_eval or None)
    if announce:
        print(format_steps(cfg, n_train, n_eval or None), flush=True)
    if loader is None:
        loader = NoData(-(-n_train // rows_per_step(cfg)))
        eval_loader = NoData(0, eval_steps) if n_eval else None
    return loader, eval_loader, total
