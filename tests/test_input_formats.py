"""OpenAI messages, ShareGPT and Alpaca records: mapped onto the same rendering and labels as the
project's own sample types, per-sample and run-level system text, FILE:LINE validation with
"did you mean" for near-miss names."""
import json
import os

import pytest

from data.dataset import DataError, build_rows
from data.samples import check, parts_for
from data.templates import get_template
from tests.helpers import REPO
from tests.test_data_templates import _bpe, _sp_model
from data.tokenizer import CHATGLM3_SPECIALS, SPTokenizer

WORD = {"type": "object", "properties": {"word": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "find a word", "parameters": WORD}}]
CONV = {"type": "conversation", "system": "Be brief.",
        "rounds": [["ask", "Hi"], ["ans", "Hello!"], ["ask", "Bye"], ["ans", "See you."]]}
OPENAI = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                       {"role": "assistant", "content": "See you."}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                              {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "See you."}],
            "system": "Be brief."}
API = {"type": "conver_has_api", "api_desc": json.dumps(TOOLS, ensure_ascii=False),
       "rounds": [["ask", "Define quay"],
                  ["ans-api", {"actions": [{"inner_thought": "Look it up.", "api_name": "lookup",
                                            "api_param": "{\"word\": \"quay\"}", "api_res": "a platform"}],
                               "ans": "A platform."}]]}
OPENAI_API = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "Define quay"},
    {"role": "assistant", "content": "Look it up.",
     "tool_calls": [{"id": "c1", "type": "function",
                     "function": {"name": "lookup", "arguments": "{\"word\": \"quay\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "a platform"},
    {"role": "assistant", "content": "A platform."}]}
SHAREGPT_API = {"tools": json.dumps(TOOLS, ensure_ascii=False), "conversations": [
    {"from": "human", "value": "Define quay"},
    {"from": "function_call", "value": "{\"name\": \"lookup\", \"arguments\": {\"word\": \"quay\"}}"},
    {"from": "observation", "value": "a platform"}, {"from": "gpt", "value": "A platform."}]}


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toks")
    glm = SPTokenizer(_sp_model(tmp, "glm"), CHATGLM3_SPECIALS, adds_bos=False)
    llama = SPTokenizer(_sp_model(tmp, "llama"), (), adds_bos=True)
    bloom = _bpe(["<unk>", "<s>", "</s>", "<pad>"], eos="</s>", pad="<pad>")
    return {"chatglm3": get_template("chatglm3", glm), "llama2": get_template("llama2", llama),
            "plain": get_template("plain", bloom)}


def enc(t, rec):
    e = t.encode(parts_for(t, *check(rec)))
    return e.ids, e.labels


@pytest.mark.parametrize("family", ["chatglm3", "llama2", "plain"])
def test_openai_and_sharegpt_render_as_the_conversation(templates, family):
    t = templates[family]
    assert check(OPENAI)[0] == "messages" and check(SHAREGPT)[0] == "sharegpt"
    assert enc(t, OPENAI) == enc(t, CONV) == enc(t, SHAREGPT)
    assert "Be brief." in t.tok.decode(enc(t, OPENAI)[0])


@pytest.mark.parametrize("family", ["chatglm3", "llama2"])
def test_tool_calls_render_as_conver_has_api(templates, family):
    t = templates[family]
    want = enc(t, API)
    assert enc(t, OPENAI_API) == want
    # ShareGPT function calls carry no thought; same as an action whose inner_thought is empty
    api = json.loads(json.dumps(API))
    api["rounds"][1][1]["actions"][0]["inner_thought"] = ""
    assert enc(t, SHAREGPT_API) == enc(t, api)
    # transformers-style arguments as an object mean the same call
    obj = json.loads(json.dumps(OPENAI_API))
    obj["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"word": "quay"}
    assert enc(t, obj) == want


@pytest.mark.parametrize("family", ["llama2", "plain"])
def test_alpaca_renders_as_instruct_and_history_as_conversation(templates, family):
    t = templates[family]
    alpaca = {"instruction": "Name the season.", "input": "Leaves fall.", "output": "Autumn.", "system": "Be brief."}
    instruct = {"type": "instruct", "instruct": "Name the season.", "input": "Leaves fall.", "output": "Autumn.",
                "system": "Be brief."}
    assert check(alpaca)[0] == "alpaca" and enc(t, alpaca) == enc(t, instruct)
    hist = {"instruction": "Bye", "output": "See you.", "history": [["Hi", "Hello!"]], "system": "Be brief."}
    assert enc(t, hist) == enc(t, CONV)


def test_run_level_system_prompt_and_per_sample_override(templates):
    glm = templates["chatglm3"].tok
    run = get_template("chatglm3", glm, system_prompt="Be brief.")
    no_system = {k: v for k, v in CONV.items() if k != "system"}
    assert enc(run, no_system) == enc(templates["chatglm3"], CONV)
    own = dict(CONV, system="Answer in French.")
    assert "Answer in French." in glm.decode(enc(run, own)[0]) and "Be brief." not in glm.decode(enc(run, own)[0])
    # instruct samples take it too
    ins = {"type": "instruct", "instruct": "Name the season.", "output": "Autumn."}
    assert enc(run, ins) == enc(templates["chatglm3"], dict(ins, system="Be brief."))


def _line(c):
    return c if isinstance(c, str) else json.dumps(c)


# (record, expected message fragment, reason with strict: false)
BAD = [
    ({"type": "instruction", "instruction": "x", "output": "y"},
     "'type' 'instruction'; expected one of pretrain, instruct, conversation, conver_has_api, ref_qa, or a record"
     " with 'messages' (OpenAI), 'conversations' (ShareGPT) or 'instruction' (Alpaca) and no 'type'; "
     "did you mean 'instruct'?",
     "unknown type"),
    ({"type": "instruct", "instruction": "x", "output": "y"},
     "unknown field 'instruction' in a instruct sample; did you mean 'instruct'?", "unknown field"),
    ({"message": [{"role": "user", "content": "x"}]}, "the record has 'message': did you mean 'messages'?",
     "missing type"),
    ({"conversation": [{"from": "human", "value": "x"}]},
     "the record has 'conversation': did you mean 'conversations'?", "missing type"),
    ({"type": "conversation", "messages": [{"role": "user", "content": "x"}]},
     "the record has 'messages': remove 'type' to read it as messages", "bad rounds"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assitant", "content": "y"}]},
     "message 2: unknown or missing role 'assitant'; expected one of system, user, assistant, tool; did you mean "
     "'assistant'?", "unknown role"),
    ({"messages": [{"role": "human", "content": "x"}, {"role": "gpt", "content": "y"}]},
     "'human' is a ShareGPT role (messages use 'user')", "unknown role"),
    ({"messages": [{"role": "user", "contents": "x"}, {"role": "assistant", "content": "y"}]},
     "message 1: unknown field 'contents'; did you mean 'content'?", "unknown field"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "y"}]}, "message 2: a system message must be the first message",
     "bad round order"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"},
                   {"role": "assistant", "content": "y"}]}, "message 2: a tool message must follow an assistant",
     "bad round order"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{bad"}}]}, {"role": "tool", "content": "r"},
        {"role": "assistant", "content": "y"}]}, "message 2 tool_calls[1].function.arguments is not valid JSON",
     "api_param not a JSON string"),
    ({"messages": [{"role": "user", "content": "x"}]}, "messages: no assistant turn: nothing to train on",
     "nothing to train"),
    ({"messages": [{"role": "assistant", "content": "y"}]}, "messages: the conversation starts with 'assistant'",
     "bad round order"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]},
     "message 2: 'weight' 0 is not supported", "unsupported"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gtp", "value": "y"}]},
     "conversations 2: unknown or missing 'from' 'gtp'", "unknown role"),
    ({"conversations": [{"role": "user", "content": "x"}]}, "a ShareGPT turn is {\"from\": ..., \"value\": ...}",
     "unknown role"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "lookup(x)"},
                        {"from": "observation", "value": "r"}, {"from": "gpt", "value": "y"}]},
     "conversations 2: a function_call value must be JSON", "bad api action"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": ""}]},
     "conversations 2 (gpt): 'value' must be a non-empty string", "empty field"),
    ({"instruction": "x", "outptu": "y"}, "unknown field 'outptu' in a alpaca sample; did you mean 'output'?",
     "unknown field"),
    ({"instruction": "x", "output": "y", "history": [["q"]]}, "history 1 must be a [question, answer] pair",
     "bad rounds"),
    ({"instruction": "x", "output": "y", "sytem": "s"}, "unknown field 'sytem' in a alpaca sample; did you mean "
     "'system'?", "unknown field"),
    ({"instruction": "x", "output": "y", "system": 3}, "field 'system' must be a string, got int", "wrong field type"),
    ({"type": "pretrain", "text": "x"}, None, None),
]


def test_bad_records_name_file_line_and_the_near_miss(tmp_path, templates):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(_line(r) for r, _, _ in BAD) + "\n")
    with pytest.raises(DataError) as e:
        build_rows([str(p)], templates["plain"], 64, cache=False)
    msg = str(e.value)
    assert f"{len(BAD) - 1} bad sample(s)" in msg
    for i, (_, needle, _) in enumerate(BAD, 1):
        if needle:
            line = msg.split(f"{p}:{i}: ")[1].split("\n")[0]
            assert needle in line, (i, needle, line)
    _, stats = build_rows([str(p)], templates["plain"], 64, strict=False)
    want = {}
    for _, _, reason in BAD:
        if reason:
            want[reason] = want.get(reason, 0) + 1
    assert stats.skipped == want and stats.samples == {"pretrain": 1}


def test_shipped_formats_file_and_run_level_system_prompt_in_dry_run(tmp_path, capsys):
    """The config key system_prompt reaches the template: the shown ShareGPT/Alpaca samples carry it."""
    from ppllm import convert as cm
    from ppllm.train import main
    from ppllm.tiny import make_llama
    tok = _bpe(["<unk>", "<s>", "</s>", "<pad>"], eos="</s>", pad="<pad>")
    tok.hf.save_pretrained(str(tmp_path / "tok"))
    make_llama(str(tmp_path / "hf"), 300, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    cm.hg_to_pp(str(tmp_path / "hf"), str(tmp_path / "pp"), quiet=True)
    cfg = {"model_topo": {"process_topology": {"axes": ["pipe", "data"], "dims": [2, 1]}},
           "model_path": str(tmp_path / "pp"), "tokenizer_path": str(tmp_path / "tok"),
           "save_path": str(tmp_path / "out"), "template": "plain",
           "data_path": os.path.join(REPO, "data", "samples", "formats.jsonl"), "max_seq_len": 512,
           "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1}
    path = tmp_path / "c.yml"
    path.write_text(json.dumps(cfg))
    assert main(str(path), ["system_prompt=Speak like a sailor."], dry=True, show_samples=5) == 0
    out = capsys.readouterr().out
    assert "messages=2" in out and "sharegpt=1" in out and "alpaca=2" in out
    blocks = out.split("== sample ")[1:]
    assert len(blocks) == 5
    assert "Answer in one sentence." in blocks[0] and "sailor" not in blocks[0]   # the sample's own system wins
    assert "sailor" in blocks[1] and "Be brief." in blocks[2] and "sailor" in blocks[3]
    assert "«4.2 metres and rising.</s>»" in blocks[1] and "«Action: tide" in blocks[1]
    assert main(str(path), [], dry=True, show_samples=5) == 0
    assert "sailor" not in capsys.readouterr().out  # a different system prompt is a different cache entry
