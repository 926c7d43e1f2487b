"""Through the CLIs: hg_to_pp -> deepspeed train_pp.py (pipe=2) -> pp_to_hg -> transformers."""
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppllm.tiny import make_llama, sample_texts, train_sentencepiece
from tests.helpers import PY, REPO, launch, run

pytestmark = pytest.mark.multiprocess  # DeepSpeed launches: not in make test-fast

TEXTS = ["The lighthouse keeper counted the ships every evening.",
         "Maria planted tomatoes, beans and basil behind the kitchen.",
         "The train to the coast leaves at nine and arrives before noon.",
         "Every winter the lake freezes and children skate across it."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    tok = train_sentencepiece(sample_texts(f"{REPO}/data/samples/demo.json"), str(root / "tok"))
    vocab = len(AutoTokenizer.from_pretrained(tok))
    make_llama(str(root / "hf"), vocab, tokenizer_dir=tok, seed=3, num_hidden_layers=2)
    run([PY, "convert_model.py", "hg_to_pp", "--input-path", str(root / "hf"), "--save-path", str(root / "pp")])
    data = root / "texts.jsonl"
    data.write_text("\n".join(json.dumps({"type": "pretrain", "text": t}) for t in TEXTS))
    return root, data


def write_config(root, data, name, dims, steps, mbs, gas, precision="fp32"):
    cfg = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": dims}},
           "model_path": str(root / "pp"), "save_path": str(root / name), "data_path": str(data),
           "max_seq_len": 48, "packing": False, "max_steps": steps, "n_epoches": 1000, "save_interval": 10,
           "template": "plain", "train_micro_batch_size_per_gpu": mbs, "gradient_accumulation_steps": gas,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}},
           "gradient_clipping": 1.0, "precision": precision, "eval_data_path": str(data), "eval_interval": 20,
           "lr_schedule": {"type": "constant"}}
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.timeout(400)
def test_train_pipe2_memorises_and_exports(setup):
    root, data = setup
    cfg = write_config(root, data, "run", [2, 1], 40, 2, 2)
    p = launch(["train_pp.py", "--config", str(cfg)], 2)
    assert "step 40/40" in p.stdout
    metrics = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 41))
    assert metrics[-1]["loss"] < 0.3 * metrics[0]["loss"], (metrics[0], metrics[-1])
    assert (root / "run" / "global_step10").is_dir() and (root / "run" / "latest").read_text() == "global_step40"

    # a training save_path converts directly (latest tag)
    run([PY, "convert_model.py", "pp_to_hg", "--input-path", str(root / "run"), "--save-path", str(root / "out")])
    tok = AutoTokenizer.from_pretrained(root / "out")
    model = AutoModelForCausalLM.from_pretrained(root / "out").eval()
    total, count = 0.0, 0
    for text in TEXTS:
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits
        total += F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
        count += len(ids) - 1
    hf_loss = total / count
    last = metrics[-1]["loss"]
    # the exported weights are one optimizer step newer than the last logged loss
    assert abs(hf_loss - last) < 0.05 + 0.5 * last, (hf_loss, last)
    # the final eval ran on the same rows with the final weights: token-weighted, it equals transformers' loss
    torch.testing.assert_close(metrics[-1]["eval_loss"], hf_loss, rtol=0, atol=1e-4)
    assert "eval_loss" in metrics[19] and "eval_loss" not in metrics[18]
    for key in ("lr", "grad_norm", "tokens", "trained_tokens", "samples", "tokens_per_s", "samples_per_s",
                "bubble", "step_time"):
        assert metrics[-1][key] is not None, key
    assert metrics[-1]["samples"] == 4 and metrics[-1]["bubble"] == round(1 / 3, 4)
    assert (root / "run" / "tensorboard").is_dir()
    # it memorised: greedy continuation of a prefix reproduces the text
    ids = [tok.bos_token_id] + tok(TEXTS[0], add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids[:4]]), max_new_tokens=len(ids) - 4, do_sample=False)
    assert out[0].tolist() == ids, tok.decode(out[0])


@pytest.mark.timeout(400)
def test_train_pipe2_data2(setup):
    root, data = setup
    cfg = write_config(root, data, "run22", [2, 2], 6, 1, 2, precision="bf16")
    p = launch(["train_pp.py", "--config", str(cfg)], 4)
    assert "step 6/6" in p.stdout and "precision bf16" in p.stdout
    metrics = [json.loads(line) for line in (root / "run22" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 6 and metrics[-1]["loss"] < metrics[0]["loss"]
    run([PY, "convert_model.py", "pp_to_hg", "--input-path", str(root / "run22"), "--save-path",
         str(root / "out22")])
    assert AutoModelForCausalLM.from_pretrained(root / "out22") is not None


def test_world_size_mismatch_is_reported_before_training(setup):
    root, data = setup
    cfg = write_config(root, data, "bad", [2, 2], 2, 1, 1)
    from tests.helpers import DEEPSPEED, free_port, run_group
    p = run_group([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "train_pp.py",
                   "--config", str(cfg)], 300)
    assert p.returncode != 0
    assert "needs 4 processes, but 2 were launched" in p.stdout + p.stderr
