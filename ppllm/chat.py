"""Chat with an exported model, using the template code that rendered the training samples.

    python -m ppllm.chat --model EXPORT --prompt "What is a quay?"      # one answer, then exit
    python -m ppllm.chat --model EXPORT --system "Be brief."            # interactive; /reset, /exit

EXPORT is a folder written by ``convert_model.py pp_to_hg`` (or any Hugging Face folder of a
supported family). Tokens are printed as they are generated. The prompt ids come from
``data.templates`` (``chat_prompt``), exactly as in training, and generation stops on the
template's stop tokens.

``write_chat_template`` (called by ``pp_to_hg``) stores the same format as a Jinja
``chat_template`` in the export's ``tokenizer_config.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping


def _hf_chat_ids(hf, jinja: str, messages: list[dict]) -> list[int]:
    out = hf.apply_chat_template(messages, chat_template=jinja, add_generation_prompt=True, tokenize=True)
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    return list(ids[0] if ids and isinstance(ids[0], list) else ids)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


def write_chat_template(folder: str, model_type: str | None = None) -> dict | None:
    """Write the template's Jinja ``chat_template`` into ``folder/tokenizer_config.json`` (and over a
    ``chat_template.jinja`` there, which transformers would prefer). The variant is the one whose
    rendering, tokenized the way users will (``apply_chat_template`` of the folder's HF tokenizer;
    for chatglm3/baichuan2, whose remote tokenizers do not load, split at special tokens and
    SentencePiece-encoded), equals ppllm's prompt ids on probe conversations. Returns
    ``{"template", "exact"}`` (plus ``error`` when nothing could be written), or None when the
    folder has no tokenizer."""
    from data.templates import get_template, pick_chat_template, render_chat_template
    from data.tokenizer import load_tokenizer
    if not any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES):
        return None  # a model without a tokenizer: nothing to describe
    try:
        tok = load_tokenizer(folder, model_type)
    except OSError:  # no tokenizer files in the folder: nothing to describe
        return None
    except Exception as e:  # an unusable tokenizer must not cost the weights export
        return {"template": None, "exact": False, "error": f"the tokenizer does not load ({e})"}
    try:
        template = get_template("auto", tok, model_type)
        if tok.kind == "hf":
            def encode_chat(jinja, messages):
                return _hf_chat_ids(tok.hf, jinja, messages)
        else:
            def encode_chat(jinja, messages):
                return tok.encode_with_specials(render_chat_template(jinja, messages))
        jinja, exact = pick_chat_template(template, encode_chat)
    except Exception as e:
        return {"template": None, "exact": False, "error": f"{type(e).__name__}: {e}"}
    if jinja is None:
        return None
    path = os.path.join(folder, "tokenizer_config.json")
    cfg = {}
    if os.path.isfile(path):
        with open(path) as f:
            cfg = json.load(f)
    cfg["chat_template"] = jinja
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    side = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(side):
        with open(side, "w") as f:
            f.write(jinja)
    return {"template": template.name, "exact": exact}


class Streamer:
    """``generate``'s streamer interface (put/end): prints the new text as tokens arrive, decoded with
    ppllm's tokenizer; the prompt (the first put) and the stop tokens are not printed."""

    def __init__(self, tok, stop_ids: list[int], out=sys.stdout):
        self.tok, self.stop, self.out = tok, set(stop_ids), out
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids += [int(i) for i in value.reshape(-1).tolist() if int(i) not in self.stop]
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # the middle of a multi-byte character: wait for the rest
            return
        self.out.write(text[self.shown:])
        self.out.flush()
        self.shown = len(text)

    def end(self) -> None:
        text = self.tok.decode(self.ids)
        self.out.write(text[self.shown:] + "\n")
        self.out.flush()

    def text(self) -> str:
        return self.tok.decode(self.ids)


def load(model_dir: str, template_name: str = "auto", trust_remote_code: bool = False):
    """(model, ppllm tokenizer, template) of an exported folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from data.templates import get_template
    from data.tokenizer import load_tokenizer
    with open(os.path.join(model_dir, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    tok = load_tokenizer(model_dir, model_type)
    try:
        template = get_template(template_name, tok, model_type)
    except ValueError as e:  # a template this tokenizer cannot encode (its special tokens are missing)
        raise SystemExit(f"ppllm.chat: error: --template {template_name} with {model_dir}: "
                         f"{' '.join(str(e).split())}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust_remote_code,
                                                     dtype=torch.float32 if not torch.cuda.is_available() else "auto")
    except (ValueError, OSError, ImportError) as e:
        raise SystemExit(f"ppllm.chat: error: transformers cannot load {model_dir} ({model_type}): "
                         f"{str(e).splitlines()[0]}; for remote-code families pass --trust-remote-code") from e
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval(), tok, template


def generate(model, tok, template, ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             out=sys.stdout) -> str:
    import torch
    streamer = Streamer(tok, template.stop_ids(), out)
    kw = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        model.generate(torch.tensor([ids], device=model.device), max_new_tokens=max_new_tokens,
                       eos_token_id=template.stop_ids(), pad_token_id=tok.pad_id, streamer=streamer,
                       attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device), **kw)
    return streamer.text()


def _argument_problem(a) -> str | None:
    """A command-line value that would fail only after the model has loaded, as one line."""
    import math

    from data.templates import TEMPLATES
    if a.max_new_tokens < 1:
        return f"--max-new-tokens {a.max_new_tokens}: give the number of tokens to generate, at least 1 (e.g. 256)"
    if not math.isfinite(a.temperature) or a.temperature < 0:
        return f"--temperature {a.temperature}: give a finite number >= 0 (0 = greedy)"
    if a.template != "auto" and a.template not in TEMPLATES:
        return (f"--template {a.template!r} is not a template; use auto (the family's own, as in training) or one "
                f"of {', '.join(sorted(TEMPLATES))}")
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ppllm.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an exported folder (convert_model.py pp_to_hg)")
    p.add_argument("--prompt", default=None, help="answer this one message and exit (default: interactive)")
    p.add_argument("--system", default=None, help="system text of the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--template", default="auto", help="template name (default: the family's own, as in training)")
    p.add_argument("--trust-remote-code", action="store_true", help="let transformers run the folder's model code")
    a = p.parse_args(argv)
    problem = _argument_problem(a)
    if problem:
        print(f"ppllm.chat: error: {problem}", file=sys.stderr)
        return 2
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        print(f"ppllm.chat: error: {a.model} has no config.json; export a model with "
              f"convert_model.py pp_to_hg first", file=sys.stderr)
        return 2
    model, tok, template = load(a.model, a.template, a.trust_remote_code)
    if a.prompt is not None:
        generate(model, tok, template, template.chat_prompt([["ask", a.prompt]], system=a.system),
                 a.max_new_tokens, a.temperature)
        return 0
    print(f"ppllm.chat: {a.model} ({template.name} template). Empty line or /exit quits, /reset forgets.",
          file=sys.stderr)
    rounds: list = []
    while True:
        try:
            q = input("user> ")
        except EOFError:
            break
        if not q.strip() or q.strip() == "/exit":
            break
        if q.strip() == "/reset":
            rounds = []
            continue
        rounds.append(["ask", q])
        sys.stdout.write("assistant> ")
        ans = generate(model, tok, template, template.chat_prompt(rounds, system=a.system), a.max_new_tokens,
                       a.temperature)
        rounds.append(["ans", ans.strip() or "..."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
