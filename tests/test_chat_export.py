"""The exported chat_template reproduces ppllm's inference prompts; python -m ppllm.chat.

llama2, llama3 and ChatML are checked with ``AutoTokenizer.from_pretrained(export)
.apply_chat_template(..., add_generation_prompt=True)``. chatglm3 and baichuan2 tokenizers do not
load through AutoTokenizer under transformers 5.x (their classes are remote code), so for them
the template is rendered with transformers' own chat-template renderer (``render_jinja_template``,
the sandboxed environment apply_chat_template uses) and the string is encoded the way ppllm's
tokenizer (and the original remote tokenizers) do: split at the special tokens, each text piece
SentencePiece-encoded (``SPTokenizer.encode_with_specials``).
"""
import json
import os
import shutil
import subprocess

import pytest
import torch

from data.templates import messages_prompt, render_chat_template
from data.tokenizer import load_tokenizer
from ppllm.chat import write_chat_template
from tests.helpers import PY, REPO
from tests.test_data_templates import ASSETS, _bpe, _sp_model

CHATS = {
    "single": [{"role": "user", "content": "What is a quay?"}],
    "multi": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
              {"role": "user", "content": "Name a river."}, {"role": "assistant", "content": "The Thames."},
              {"role": "user", "content": "And another?"}],
    "system": [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "  Hi  "},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
}
IDENT = dict(normalization_rule_name="identity", remove_extra_whitespaces=False)


def _folder(tmp, name, files: dict, copy_from: str | None = None):
    d = tmp / name
    d.mkdir()
    if copy_from:
        for f in os.listdir(copy_from):
            shutil.copy(os.path.join(copy_from, f), d / f)
    for f, content in files.items():
        (d / f).write_text(json.dumps(content))
    return str(d)


def _sp_folder(tmp, name, cls, gen=None, **kw):
    d = tmp / name
    d.mkdir()
    shutil.copy(_sp_model(tmp, name + "_sp", **IDENT, **kw), d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": cls, "add_bos_token": False}))
    if gen:
        (d / "generation_config.json").write_text(json.dumps(gen))
    return str(d)


def _real(name):
    path = os.path.join(ASSETS, name)
    if not os.path.isfile(os.path.join(path, "tokenizer.model")):
        pytest.skip(f"shared tokenizer assets absent ({path})")
    return path


LLAMA2_HF_CONFIG = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False}


def make(tmp, case):
    """(folder, model_type, uses AutoTokenizer)"""
    if case == "llama2-synthetic":
        from ppllm.tiny import sample_texts, train_sentencepiece
        return train_sentencepiece(sample_texts(f"{REPO}/data/samples/demo.json"), str(tmp / case)), "llama", True
    if case == "llama2-real":
        return _folder(tmp, case, {"tokenizer_config.json": LLAMA2_HF_CONFIG}, _real("llama2")), "llama", True
    if case == "llama3-synthetic":
        tok = _bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                   bos="<|begin_of_text|>", eos="<|end_of_text|>")
        tok.hf.save_pretrained(str(tmp / case))
        return str(tmp / case), "llama", True
    if case == "chatml-synthetic":
        tok = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|endoftext|>")
        tok.hf.save_pretrained(str(tmp / case))
        return str(tmp / case), "qwen2", True
    if case == "plain-synthetic":  # bloom: byte-level BPE, no chat format of its own
        tok = _bpe(["<unk>", "<s>", "</s>", "<pad>"], eos="</s>", pad="<pad>")
        tok.hf.save_pretrained(str(tmp / case))
        return str(tmp / case), "bloom", True
    if case == "chatglm3-real":
        return _folder(tmp, case, {}, _real("chatglm3")), "chatglm", False
    if case == "chatglm3-synthetic":
        return _sp_folder(tmp, case, "ChatGLMTokenizer"), "chatglm", False
    if case == "baichuan2-real":
        return _folder(tmp, case, {}, _real("baichuan2")), "baichuan", False
    if case == "baichuan2-synthetic":
        return _sp_folder(tmp, case, "BaichuanTokenizer", {"user_token_id": 3, "assistant_token_id": 4},
                          add_dummy_prefix=False, user_defined_symbols=["<reserved_106>", "<reserved_107>"]), \
            "baichuan", False
    raise KeyError(case)


CASES = ["llama2-synthetic", "llama2-real", "llama3-synthetic", "chatml-synthetic", "plain-synthetic",
         "chatglm3-real", "chatglm3-synthetic", "baichuan2-real", "baichuan2-synthetic"]


@pytest.mark.parametrize("case", CASES)
def test_exported_chat_template_gives_ppllms_prompt_ids(tmp_path, case):
    from data.templates import get_template
    folder, model_type, auto = make(tmp_path, case)
    info = write_chat_template(folder, model_type)
    assert info and info["exact"], info
    jinja = json.loads(open(os.path.join(folder, "tokenizer_config.json")).read())["chat_template"]
    template = get_template("auto", load_tokenizer(folder, model_type), model_type)
    assert template.name == case.split("-")[0]
    if auto:
        from transformers import AutoTokenizer
        hf = AutoTokenizer.from_pretrained(folder)
        assert hf.chat_template == jinja
    for name, chat in CHATS.items():
        want = messages_prompt(template, chat)
        if auto:
            got = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            got = got["input_ids"] if isinstance(got, dict) or hasattr(got, "keys") else got
        else:
            got = load_tokenizer(folder, model_type).encode_with_specials(render_chat_template(jinja, chat))
        assert list(got) == want, (name, template.tok.decode(want), template.tok.decode(list(got)))


def test_chat_template_rejects_tool_messages(tmp_path):
    from jinja2 import TemplateError
    folder, model_type, _ = make(tmp_path, "chatml-synthetic")
    write_chat_template(folder, model_type)
    jinja = json.loads(open(os.path.join(folder, "tokenizer_config.json")).read())["chat_template"]
    with pytest.raises(TemplateError, match="got role tool"):
        render_chat_template(jinja, [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A tiny llama with a SentencePiece tokenizer, converted to a pipeline folder and exported."""
    from ppllm import convert as cm
    from tests.helpers import tiny_pipeline_model
    root = tmp_path_factory.mktemp("export")
    pp, _ = tiny_pipeline_model(root, ["x"])
    cm.pp_to_hg(str(pp), str(root / "hf_out"), quiet=True)
    return root / "hf_out"


def test_pp_to_hg_writes_the_chat_template(tiny_export):
    from transformers import AutoTokenizer
    from data.templates import get_template
    hf = AutoTokenizer.from_pretrained(tiny_export)
    assert "[INST]" in hf.chat_template
    t = get_template("auto", load_tokenizer(str(tiny_export), "llama"), "llama")
    got = hf.apply_chat_template(CHATS["system"], add_generation_prompt=True, tokenize=True)
    got = got["input_ids"] if hasattr(got, "keys") else got
    assert list(got) == messages_prompt(t, CHATS["system"])


def test_chat_cli_one_shot_streams_the_templates_answer(tiny_export):
    from transformers import AutoModelForCausalLM
    from data.templates import get_template
    tok = load_tokenizer(str(tiny_export), "llama")
    t = get_template("auto", tok, "llama")
    ids = t.chat_prompt([["ask", "How many arches?"]], system="Be brief.")
    model = AutoModelForCausalLM.from_pretrained(tiny_export).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=t.stop_ids(),
                             pad_token_id=tok.pad_id)
    new = [i for i in out[0, len(ids):].tolist() if i not in t.stop_ids()]
    want = tok.decode(new)
    assert want.strip()
    p = subprocess.run([PY, "-m", "ppllm.chat", "--model", str(tiny_export), "--prompt", "How many arches?",
                        "--system", "Be brief.", "--max-new-tokens", "12"], capture_output=True, text=True,
                       cwd=REPO, timeout=240)
    assert p.returncode == 0, p.stderr
    assert p.stdout == want + "\n"
    # interactive: two turns from stdin, the second prompt carries the first answer
    p = subprocess.run([PY, "-m", "ppllm.chat", "--model", str(tiny_export), "--max-new-tokens", "4"],
                       input="Hi\nBye\n", capture_output=True, text=True, cwd=REPO, timeout=240)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("assistant> ") == 2 and p.stdout.count("user> ") == 3


def test_chat_cli_names_a_missing_export(tmp_path):
    p = subprocess.run([PY, "-m", "ppllm.chat", "--model", str(tmp_path), "--prompt", "x"], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2 and "has no config.json" in p.stderr and "pp_to_hg" in p.stderr
