"""Chat templates per family: exact ids on the real tokenizers (skipped when the shared
assets are absent) and the same rules on small tokenizers built here."""
import json
import os

import pytest

from data.preview import mark_trained
from data.samples import check, parts_for
from data.templates import get_template
from data.tokenizer import CHATGLM3_SPECIALS, SPTokenizer, Tokenizer, load_tokenizer
from tests.helpers import REPO

ASSETS = os.path.join(REPO, "..", "shared", "assets", "tokenizers")
TEXTS = ["Hello there, how can I help you today?", "The river runs past the old mill.", "Bye, see you soon.",
         "Define quay: a platform where ships load.", "What is the weather like?", "Answer in one word please."] * 4

CONV = {"type": "conversation", "rounds": [["ask", "Hi"], ["ans", "Hello!"], ["ask", "Bye"], ["ans", "See you."]]}
API = {"type": "conver_has_api", "api_desc": "lookup: find a word",
       "rounds": [["ask", "Define quay"],
                  ["ans-api", {"actions": [{"inner_thought": "Look it up.", "api_name": "lookup",
                                            "api_param": "{\"word\": \"quay\"}", "api_res": "a platform"}],
                               "ans": "A platform."}]]}
REF = {"type": "ref_qa", "reference": "The mill was built in 1820.",
       "rounds": [["ask", "When was it built?"], ["ans", "In 1820."]]}
INSTRUCT = {"type": "instruct", "instruct": "Name the season.", "input": "Leaves fall.", "output": "Autumn."}
PRETRAIN = {"type": "pretrain", "text": "The river runs."}


def encode(t, rec):
    enc = t.encode(parts_for(t, *check(rec)))
    assert enc.trained == sum(l != -100 for l in enc.labels)  # the encoder's own count, used by prepare
    return enc


def trained_ids(enc):
    return [l for l in enc.labels if l != -100]


# -- small tokenizers built by the tests -------------------------------------------------------


def _sp_model(tmp, name, **kw):
    import sentencepiece as spm
    corpus = tmp / f"{name}.txt"
    corpus.write_text("\n".join(TEXTS))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp / name), vocab_size=400, model_type="bpe",
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, byte_fallback=True,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2, **kw)
    return str(tmp / f"{name}.model")


def _bpe(specials, bos=None, eos=None, pad=None):
    from tokenizers import Tokenizer as RawTok, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    raw = RawTok(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=bos, eos_token=eos, pad_token=pad),
                     fingerprint="test-" + "".join(specials))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("toks")
    toks = {"llama2": SPTokenizer(_sp_model(tmp, "llama"), (), adds_bos=True),
            "chatglm3": SPTokenizer(_sp_model(tmp, "glm"), CHATGLM3_SPECIALS, adds_bos=False),
            "baichuan2": SPTokenizer(_sp_model(tmp, "bc", add_dummy_prefix=False,
                                               user_defined_symbols=["<reserved_106>", "<reserved_107>"]),
                                     (), adds_bos=False, generation_config={"user_token_id": 3,
                                                                            "assistant_token_id": 4}),
            "llama3": _bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|end_of_text|>"),
            "bloom": _bpe(["<unk>", "<s>", "</s>", "<pad>"], eos="</s>", pad="<pad>")}
    return toks


@pytest.mark.parametrize("family", ["llama2", "llama3", "chatglm3", "baichuan2", "plain"])
@pytest.mark.parametrize("rec", [CONV, API, REF], ids=["conversation", "api", "ref_qa"])
def test_inference_prompt_is_the_training_prefix(tiny, family, rec):
    tok = tiny["bloom" if family == "plain" else family]
    t = get_template(family, tok)
    enc = encode(t, rec)
    rounds = rec["rounds"][:-1]
    prompt = t.chat_prompt(rounds, tools=rec.get("api_desc"), system=None) if rec is not REF else None
    if prompt is not None:
        assert enc.ids[:len(prompt)] == prompt
        # nothing of the prompt is trained except the stop token of an earlier answer
        first_trained = next(i for i, l in enumerate(enc.labels) if l != -100)
        assert first_trained >= 1
    last_answer = rec["rounds"][-1][1]
    last_answer = last_answer["ans"] if isinstance(last_answer, dict) else last_answer
    text = tok.decode(trained_ids(enc))
    assert last_answer.strip().rstrip(".") in text
    assert "Hi" not in text and "Define quay" not in text and "1820." not in text.replace("In 1820.", "")
    if rec is API:
        assert "a platform" not in text.replace("A platform", "")  # the API result is not trained
        assert "lookup" in text  # the call is
    # exactly one end-of-sequence token in a document (no double EOS)
    assert enc.ids.count(tok.eos_id) <= rec["rounds"].count(["ans"]) + 2


@pytest.mark.parametrize("family", ["llama2", "llama3", "chatglm3", "baichuan2", "plain"])
def test_pretrain_and_instruct_single_eos(tiny, family):
    tok = tiny["bloom" if family == "plain" else family]
    t = get_template(family, tok)
    enc = encode(t, PRETRAIN)
    stop = t.stop_ids()
    end = enc.ids[-1]
    assert end in stop or end == tok.eos_id
    assert enc.ids.count(end) == 1 and enc.labels[-1] == -100
    assert trained_ids(enc)[-1] == end
    enc = encode(t, INSTRUCT)
    assert trained_ids(enc).count(enc.ids[-1]) == 1 and enc.ids[-2] != enc.ids[-1]
    assert tok.decode(trained_ids(enc)[:-1]).strip() == "Autumn."


def test_bos_follows_the_tokenizer(tiny):
    assert encode(get_template("plain", tiny["bloom"]), PRETRAIN).ids[0] != tiny["bloom"].bos_id
    assert encode(get_template("llama2", tiny["llama2"]), PRETRAIN).ids[0] == 1
    assert encode(get_template("baichuan2", tiny["baichuan2"]), CONV).ids[0] == 3


def test_auto_picks_by_model_type(tiny):
    assert get_template("auto", tiny["llama2"], "llama").name == "llama2"
    assert get_template("auto", tiny["llama3"], "llama").name == "llama3"
    assert get_template("auto", tiny["chatglm3"], "chatglm").name == "chatglm3"
    assert get_template("auto", tiny["baichuan2"], "baichuan").name == "baichuan2"
    assert get_template("auto", tiny["bloom"], "bloom").name == "plain"
    with pytest.raises(ValueError, match="no '<\\|begin_of_text\\|>' token"):
        get_template("llama3", tiny["bloom"])


def test_show_samples_marks_trained_spans(tiny):
    t = get_template("plain", tiny["bloom"])
    enc = encode(t, INSTRUCT)
    text = mark_trained(tiny["bloom"], enc.ids, enc.labels)
    assert "### Response:\n«Autumn.</s>»" in text and text.count("«") == 1


def test_turn_boundary_truncation(tiny):
    from data.dataset import fit_length
    t = get_template("llama2", tiny["llama2"])
    enc = encode(t, CONV)
    ids, labels, status = fit_length(enc.ids, enc.labels, enc.cuts, len(enc.ids) - 2, "truncate")
    assert status == "truncated" and ids == enc.ids[:enc.cuts[0]] and ids[-1] == 2
    assert fit_length(enc.ids, enc.labels, enc.cuts, len(enc.ids) - 2, "drop")[2] == "dropped"
    ids, labels, _ = fit_length(enc.ids, enc.labels, enc.cuts, 5, "truncate")  # no turn fits: a hard cut
    assert len(ids) == 5 and labels[-1] == -100


# -- the real tokenizers -------------------------------------------------------------------------


def real(family, model_type):
    path = os.path.join(ASSETS, family)
    if not os.path.isfile(os.path.join(path, "tokenizer.model")):
        pytest.skip(f"shared tokenizer assets absent ({path})")
    return load_tokenizer(path, model_type)


def test_real_llama2_chat_ids():
    tok = real("llama2", "llama")
    assert tok.encode("Hello 你好") == [15043, 29871, 30919, 31076]
    t = get_template("auto", tok, "llama")
    assert t.name == "llama2"
    enc = encode(t, CONV)
    inst, close = [518, 25580, 29962], [518, 29914, 25580, 29962]
    assert enc.ids == ([1] + inst + [6324] + close + [15043, 29991, 29871, 2] +
                       [1] + inst + [2648, 29872] + close + [2823, 366, 29889, 29871, 2])
    assert trained_ids(enc) == [15043, 29991, 29871, 2, 2823, 366, 29889, 29871, 2]
    assert t.chat_prompt([["ask", "Hi"]]) == [1] + inst + [6324] + close
    pre = encode(t, PRETRAIN)
    assert pre.ids[0] == 1 and pre.ids[-1] == 2 and pre.ids.count(2) == 1


def test_real_chatglm3_chat_ids():
    tok = real("chatglm3", "chatglm")
    assert tok.encode("Hello 你好") == [13755, 36474, 54591]
    assert [tok.token_to_id(s) for s in CHATGLM3_SPECIALS] == list(range(64789, 64798))
    t = get_template("auto", tok, "chatglm")
    enc = encode(t, CONV)
    assert enc.ids == [64790, 64792, 64795, 30910, 13, 8686, 64796, 30910, 13, 13755, 30992,
                       64795, 30910, 13, 1690, 30911, 64796, 30910, 13, 3496, 344, 30930, 2]
    # the answer, its "\n" metadata, and the next role token (stop) or EOS are trained
    assert trained_ids(enc) == [30910, 13, 13755, 30992, 64795, 30910, 13, 3496, 344, 30930, 2]
    assert t.chat_prompt([["ask", "Hi"]]) == [64790, 64792, 64795, 30910, 13, 8686, 64796]
    assert set(t.stop_ids()) == {2, 64795, 64797}
    enc = encode(t, API)
    assert enc.ids[2] == 64794  # tools go into the system turn
    assert 64797 in enc.ids and 64797 in trained_ids(enc)  # <|observation|> ends the call
    obs = enc.ids.index(64797)
    assert all(l == -100 for l in enc.labels[obs:obs + 4])  # the API result is not trained


def test_real_baichuan2_chat_ids():
    tok = real("baichuan2", "baichuan")
    assert not tok.adds_bos and tok.eos_id == 2
    t = get_template("auto", tok, "baichuan")
    enc = encode(t, CONV)
    assert enc.ids == [195, 19706, 196, 23160, 73, 195, 3166, 92312, 196, 10060, 1438, 72, 2]
    # official labels (unshifted): user -> [eos] + [-100]*n, assistant -> [-100] + ids, final eos
    official = [2, -100, -100, 23160, 73, 2, -100, -100, -100, 10060, 1438, 72, 2]
    assert enc.labels == official[1:] + [-100]
    assert t.chat_prompt([["ask", "Hi"], ["ans", "Hello!"], ["ask", "Bye"]]) == [195, 19706, 196, 23160, 73, 195,
                                                                               3166, 92312, 196]


def test_real_folders_load_by_tokenizer_class(tmp_path):
    real("chatglm3", "chatglm")
    for fam in ("chatglm3", "baichuan2"):
        src = os.path.join(ASSETS, fam)
        dst = tmp_path / fam
        dst.mkdir()
        for name in os.listdir(src):
            os.symlink(os.path.join(src, name), dst / name)
        tok = load_tokenizer(str(dst))  # no model_type: tokenizer_config.json names the class
        assert isinstance(tok, SPTokenizer)
    assert json.load(open(os.path.join(ASSETS, "baichuan2", "generation_config.json")))["user_token_id"] == 195
