"""The chat formats against the original releases' own prompt builders.

Each expectation is built the original way, independently of data.templates: Meta's
``chat_completion`` string for llama-2 (system block joined with the first user message, the
whole stripped once), baichuan2's ``build_chat_input`` (system ids, then 195/196 turns),
chatglm3's ``build_chat_input`` with tools (its own intro, then the tools as JSON with indent 4),
and Qwen2's ChatML. On the real tokenizers the ids are also written out literally; the same
rules run on small tokenizers built here, so the paths are tested where the assets are absent.
"""
import json
import os

import pytest

from data.samples import check, parts_for
from data.templates import CHATGLM3_TOOLS_INTRO, get_template
from data.tokenizer import CHATGLM3_SPECIALS, SPTokenizer
from tests.test_data_templates import _bpe, _sp_model, real

SYS, USER = "  Be brief.\n", "  Hi  "
TOOLS = [{"name": "lookup", "description": "find a word",
          "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}]
API = {"type": "conver_has_api", "api_desc": json.dumps(TOOLS),
       "rounds": [["ask", "Define quay"],
                  ["ans-api", {"actions": [{"inner_thought": "", "api_name": "lookup",
                                            "api_param": "{\"word\": \"quay\"}", "api_res": "a platform"}],
                               "ans": "A platform."}]]}


def encode(t, rec):
    return t.encode(parts_for(t, *check(rec)))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synth")
    # normalisation as in the real models (identity, whitespace kept)
    kw = dict(normalization_rule_name="identity", remove_extra_whitespaces=False)
    return {"llama2": SPTokenizer(_sp_model(tmp, "llama", **kw), (), adds_bos=True),
            "chatglm3": SPTokenizer(_sp_model(tmp, "glm", **kw), CHATGLM3_SPECIALS, adds_bos=False),
            "baichuan2": SPTokenizer(_sp_model(tmp, "bc", add_dummy_prefix=False,
                                               user_defined_symbols=["<reserved_106>", "<reserved_107>"], **kw),
                                     (), adds_bos=False,
                                     generation_config={"user_token_id": 3, "assistant_token_id": 4}),
            "chatml": _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|endoftext|>")}


# -- fix 3: llama2 strips the joined system + user text once ----------------------------------------


def meta_llama2(sp_encode, bos, eos, system, dialog):
    """Meta's chat_completion: B_SYS + system + E_SYS joined to the first user message, each
    message stripped, one encode per round with BOS (and EOS after an answer)."""
    dialog = [dict(dialog[0], content="<<SYS>>\n" + system + "\n<</SYS>>\n\n" + dialog[0]["content"])] + dialog[1:]
    ids = []
    for q, a in zip(dialog[::2], dialog[1::2]):
        ids += [bos] + sp_encode(f"[INST] {q['content'].strip()} [/INST] {a['content'].strip()} ") + [eos]
    return ids + [bos] + sp_encode(f"[INST] {dialog[-1]['content'].strip()} [/INST]")


def test_llama2_system_and_user_stripped_once_real():
    tok = real("llama2", "llama")
    t = get_template("llama2", tok)
    prompt = t.chat_prompt([["ask", USER]], system=SYS)
    assert prompt == [1, 518, 25580, 29962, 3532, 14816, 29903, 6778, 13, 29871, 1522, 11473, 29889, 13, 13, 29966,
                      829, 14816, 29903, 6778, 13, 13, 29871, 6324, 518, 29914, 25580, 29962]
    assert prompt == meta_llama2(tok.sp.encode, 1, 2, SYS, [{"role": "user", "content": USER}])
    enc = encode(t, {"type": "conversation", "system": SYS, "rounds": [["ask", USER], ["ans", "Hello."]]})
    assert enc.ids == prompt + [15043, 29889, 29871, 2]
    assert [x for x in enc.labels if x != -100] == [15043, 29889, 29871, 2]


def test_llama2_system_and_user_stripped_once_synthetic(synth):
    tok = synth["llama2"]
    t = get_template("llama2", tok)
    dialog = [{"role": "user", "content": USER}, {"role": "assistant", "content": " Hello. "},
              {"role": "user", "content": "Bye\n"}]
    prompt = t.chat_prompt([["ask", USER], ["ans", " Hello. "], ["ask", "Bye\n"]], system=SYS)
    assert prompt == meta_llama2(tok.sp.encode, 1, 2, SYS, dialog)
    # the old behaviour (system and user stripped separately) differs exactly here
    assert tok.decode(prompt).count("  Be brief.\n\n<</SYS>>") == 1


# -- fix 2: baichuan2's system text comes before the first user token ----------------------------------


def test_baichuan2_system_first_real():
    tok = real("baichuan2", "baichuan")
    t = get_template("baichuan2", tok)
    assert t.chat_prompt([["ask", "Hi"]], system="Be brief.") == [6363, 9116, 72, 195, 19706, 196]
    enc = encode(t, {"type": "conversation", "system": "Be brief.", "rounds": [["ask", "Hi"], ["ans", "Hello."]]})
    assert enc.ids == [6363, 9116, 72, 195, 19706, 196, 23160, 72, 2]
    assert enc.labels == [-100, -100, -100, -100, -100, 23160, 72, 2, -100]


def test_baichuan2_system_first_synthetic(synth):
    tok = synth["baichuan2"]
    t = get_template("auto", tok, "baichuan")
    sp = tok.sp.encode
    # build_chat_input: encode(system) + [user_token_id] + encode(q) + [assistant_token_id] + ...
    want = sp("Be brief.") + [3] + sp("Hi") + [4] + sp("Hello.") + [3] + sp("Bye") + [4]
    assert t.chat_prompt([["ask", "Hi"], ["ans", "Hello."], ["ask", "Bye"]], system="Be brief.") == want
    # the run-level system_prompt is used when the sample has none, and loses to the sample's own
    t2 = get_template("baichuan2", tok, system_prompt="Be brief.")
    assert t2.chat_prompt([["ask", "Hi"], ["ans", "Hello."], ["ask", "Bye"]]) == want
    assert t2.chat_prompt([["ask", "Hi"]], system="Answer.")[:len(sp("Answer."))] == sp("Answer.")


# -- fix 1: chatglm3's tool intro is the release's own ---------------------------------------------------


def glm_tools_prefix(tok):
    g = {name: tok.token_to_id(name) for name in CHATGLM3_SPECIALS}
    intro = ("Answer the following questions as best as you can. You have access to the following tools:\n"
             + json.dumps(TOOLS, indent=4, ensure_ascii=False))
    return [g["[gMASK]"], g["sop"], g["<|system|>"]] + tok.sp.encode("\n") + tok.sp.encode(intro), g


def test_chatglm3_tool_intro_real():
    tok = real("chatglm3", "chatglm")
    t = get_template("chatglm3", tok)
    enc = encode(t, API)
    head, g = glm_tools_prefix(tok)
    assert head[:25] == [64790, 64792, 64794, 30910, 13, 20115, 267, 1762, 2554, 362, 1077, 362, 344, 457, 30930,
                         809, 431, 1675, 289, 267, 1762, 4159, 30954, 13, 30995]
    assert enc.ids[:len(head)] == head
    assert enc.ids[len(head):len(head) + 7] == [64795, 30910, 13, 4167, 478, 580, 334]  # <|user|>\n Define quay
    assert t.chat_prompt([["ask", "Define quay"]], tools=json.dumps(TOOLS)) == head + [64795, 30910, 13, 4167, 478,
                                                                                     580, 334, 64796]


def test_chatglm3_tool_intro_synthetic(synth):
    tok = synth["chatglm3"]
    t = get_template("chatglm3", tok)
    head, g = glm_tools_prefix(tok)
    sp = tok.sp.encode
    call = "```python\ntool_call(word='quay')\n```"
    # after the intro: the user turn, the call (metadata = API name), the observation, the answer
    want = (head + [g["<|user|>"]] + sp("\n") + sp("Define quay")
            + [g["<|assistant|>"]] + sp("lookup\n") + sp(call)
            + [g["<|observation|>"]] + sp("\n") + sp("a platform")
            + [g["<|assistant|>"]] + sp("\n") + sp("A platform.") + [tok.eos_id])
    enc = encode(t, API)
    assert enc.ids == want
    trained = [x for x in enc.labels if x != -100]
    assert trained == (sp("lookup\n") + sp(call) + [g["<|observation|>"]] + sp("\n") + sp("A platform.")
                       + [tok.eos_id])
    assert CHATGLM3_TOOLS_INTRO in tok.decode(enc.ids)
    # a system text replaces the intro, the tools still follow it
    d = get_template("chatglm3", tok, system_prompt="Be brief.")
    assert d.chat_prompt([["ask", "Hi"]], tools=json.dumps(TOOLS))[3:] == (
        sp("\n") + sp("Be brief.\n" + json.dumps(TOOLS, indent=4, ensure_ascii=False))
        + [g["<|user|>"]] + sp("\n") + sp("Hi") + [g["<|assistant|>"]])


# -- ChatML (qwen2) -------------------------------------------------------------------------------------------


def test_chatml_is_qwen2s_format(synth):
    tok = synth["chatml"]
    t = get_template("auto", tok, "qwen2")
    assert t.name == "chatml"
    qwen = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert t.chat_prompt([["ask", "Hi"], ["ans", "Hello."], ["ask", "Bye"]], system="Be brief.") == \
        tok.hf(qwen, add_special_tokens=False)["input_ids"]
    enc = encode(t, {"type": "conversation", "rounds": [["ask", "Hi"], ["ans", "Hello."]]})
    ime = tok.token_to_id("<|im_end|>")
    assert [x for x in enc.labels if x != -100] == tok.encode("Hello.") + [ime]  # the answer and its stop token
    assert enc.ids[-2:] == [ime] + tok.encode("\n")
    assert t.stop_ids() == [ime, tok.eos_id]
    # no default system text unless the run asks for one
    assert tok.decode(t.chat_prompt([["ask", "Hi"]])).startswith("<|im_start|>user\n")


def test_chatml_needs_its_tokens(synth):
    with pytest.raises(ValueError, match="no '<\\|im_start\\|>' token"):
        get_template("chatml", synth["llama2"])


def test_cache_key_follows_render_version_and_system_prompt(synth):
    tok = synth["llama2"]
    a, b = get_template("llama2", tok), get_template("llama2", tok, system_prompt="Be brief.")
    assert a.cache_tag() != b.cache_tag() and a.cache_tag().startswith("llama2/r")
    assert b.cache_tag() == get_template("llama2", tok, system_prompt="Be brief.").cache_tag()
