"""make demo, last step: load the exported checkpoint with transformers and generate."""
import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.templates import get_template
from data.tokenizer import load_tokenizer

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--max-new-tokens", type=int, default=24)
a = p.parse_args()
hf_tok = AutoTokenizer.from_pretrained(a.model)
model = AutoModelForCausalLM.from_pretrained(a.model).eval()
# the same template code that rendered the training samples renders the prompts
template = get_template("auto", load_tokenizer(a.model), model.config.model_type)
prompts = [("pretrain", "A pipeline splits a deep network"),
           ("instruct", "How many arches does the old bridge have?")]
for kind, text in prompts:
    ids = template.prompt_ids(text) if kind == "pretrain" else template.instruct_prompt_ids(text)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=a.max_new_tokens, do_sample=False,
                             eos_token_id=template.stop_ids(), pad_token_id=hf_tok.eos_token_id)
    print(f"[{kind}] {text!r} -> {hf_tok.decode(out[0, len(ids):], skip_special_tokens=True)!r}")
