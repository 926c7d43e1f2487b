"""ppllm's own collectives under NCCL's device rule, on CPU (tests/nccl_standin.py).

Two gloo processes pretend to be NCCL ranks on cuda:0 and cuda:1. Every function of ppllm that
issues a collective runs there: the loss normaliser, the step log's token counts, the eval
loss, the ranks' agreement on an error, the data row counts, the gradient norm and the barriers.
A host tensor reaching a collective fails the test, as it fails step 1 on a GPU cluster."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch


class FakeGrid:
    def get_data_parallel_group(self):
        return None

    def get_pipe_parallel_group(self):
        return None

    def get_data_parallel_world_size(self):
        return 2


class FakeEngine:
    """What engine.normalised / eval_step / train.evaluate read of a last-stage PipelineEngine."""
    grid = FakeGrid()
    module = SimpleNamespace(loss_fn=None)

    def __init__(self, rank):
        self.rank = rank

    def is_last_stage(self):
        return True

    def is_first_stage(self):
        return True

    def gradient_accumulation_steps(self):
        return 1

    def eval_batch(self, batches):
        return 2.0 + self.rank  # a per-replica mean, as the engine returns it


def _batch(rank, trained):
    ids = torch.arange(6).view(1, 6)
    labels = torch.full((1, 6), -100)
    labels[0, :trained] = 1
    doc = torch.zeros(1, 6, dtype=torch.long)
    return [((ids, ids, doc), labels)]


def _checks(rank):
    """Each control-plane caller once; returns what it computed (the same on a real NCCL run)."""
    from ppllm import collectives, ds_compat, errors, feed
    from ppllm import engine as eng
    from ppllm import train
    out = {}
    out["all_reduce"] = collectives.all_reduce([rank + 1.0, 2.0])
    out["broadcast"] = collectives.broadcast_object({"from": rank}, src=1)
    out["gather"] = collectives.all_gather_object(f"host{rank}")
    grad = torch.full((3,), float(rank + 1))
    out["all_reduce_"] = collectives.all_reduce_(grad).tolist()  # computed on the host, reduced on the device
    collectives.barrier()
    out["agree"] = errors.agree(lambda: rank * 10)
    try:
        errors.agree(lambda: (_ for _ in ()).throw(errors.UserError("bad.jsonl:3: broken")) if rank else 0)
    except errors.UserError as e:
        out["agree_error"] = str(e)
    engine = FakeEngine(rank)
    batches = _batch(rank, trained=2 + rank)  # 2 and 3 trained tokens: the step has 5
    from models.common import TokenLoss
    engine.module = SimpleNamespace(loss_fn=TokenLoss())
    eng.normalised(engine, batches)
    out["scale"] = engine.module.loss_fn.normaliser[0]
    loader = SimpleNamespace(one_pass=lambda: iter([_batch(rank, trained=1 + rank)]))
    out["eval"] = train.evaluate(engine, loader)
    log = object.__new__(train.StepLog)
    log.run = SimpleNamespace(is_first=True, engine=engine)
    log.rank0 = False
    out["record"] = log.record(1, 0.5, batches, 1.0)
    out["rows"] = feed.agreed_row_counts([7, 3] if rank == 0 else [-1, -1])
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), float(rank + 1))
    out["grad_norm"] = ds_compat.pipeline_grad_norm([p], None)
    return out


def _worker(rank, world, port, out_dir, standin):
    import torch.distributed as dist

    from tests import nccl_standin
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result = {}
    if standin:
        nccl_standin.install(local_rank=rank)
        try:  # the stand-in bites: a host tensor handed straight to a collective fails as on NCCL
            dist.all_reduce(torch.ones(1))
            result["host_tensor"] = "accepted"
        except nccl_standin.NcclRuleError as e:
            result["host_tensor"] = str(e)
        try:
            dist.barrier(device_ids=[1 - rank])
            result["other_device"] = "accepted"
        except nccl_standin.NcclRuleError:
            result["other_device"] = "refused"
        dist.barrier(device_ids=[rank])  # keep the ranks in step after the refused one
    try:
        result.update(_checks(rank))
    except nccl_standin.NcclRuleError as e:
        result["failed"] = str(e)
    finally:
        nccl_standin.uninstall()
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(result, f)
    # Leave together: a rank tearing gloo down while its peer still talks to it (rank 0 also
    # serves the rendezvous store) can abort the process ("terminate called without an active
    # exception"), seen once under CI load.
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(180)
@pytest.mark.multiprocess
def test_every_control_plane_collective_obeys_nccls_device_rule(tmp_path):
    import torch.multiprocessing as mp

    from tests.helpers import free_port
    got = {}
    for standin in (False, True):  # plain gloo first: the same numbers with and without the rule
        d = tmp_path / str(standin)
        d.mkdir()
        mp.start_processes(_worker, args=(2, free_port(), str(d), standin), nprocs=2, start_method="spawn")
        got[standin] = [json.loads((d / f"{r}.json").read_text()) for r in range(2)]
    for r in range(2):
        res = got[True][r]
        assert "failed" not in res, res["failed"]
        assert "NCCL only takes tensors on the current device cuda:%d" % r in res["host_tensor"]
        assert res["other_device"] == "refused"
        plain = got[False][r]
        for key in plain:
            assert res[key] == plain[key], key
    r0, r1 = got[True]
    assert r0["all_reduce"] == [3.0, 4.0] and r0["broadcast"] == {"from": 1} and r0["gather"] == ["host0", "host1"]
    assert r0["all_reduce_"] == [3.0] * 3
    assert r0["agree"] == 0 and r0["agree_error"] == r1["agree_error"] == "bad.jsonl:3: broken"
    assert r0["scale"] == r1["scale"] == pytest.approx(2 / 5)  # gas 1 x dp 2 / 5 trained tokens
    # replica means 2 and 3 over 1 and 2 tokens: (2*1 + 3*2) / 3
    assert r0["eval"] == r1["eval"] == pytest.approx(8 / 3)
    assert r0["record"] is None and r0["rows"] == r1["rows"] == [7, 3]
    assert r0["grad_norm"] == pytest.approx((4 * 1 + 4 * 4) ** 0.5)
