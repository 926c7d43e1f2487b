"""make demo, step 1: a SentencePiece tokenizer trained on the shipped samples and a tiny llama."""
import argparse
import shutil

from ppllm.tiny import make_llama, sample_texts, train_sentencepiece

p = argparse.ArgumentParser()
p.add_argument("--data", default="data/samples/demo.json")
p.add_argument("--out", default="demo_out/hf_init")
a = p.parse_args()
shutil.rmtree(a.out, ignore_errors=True)
tok_dir = a.out + "_tokenizer"
train_sentencepiece(sample_texts(a.data), tok_dir)
from transformers import AutoTokenizer
vocab = len(AutoTokenizer.from_pretrained(tok_dir))
make_llama(a.out, vocab, tokenizer_dir=tok_dir)
shutil.rmtree(tok_dir)
print(f"demo: tiny llama (4 layers, hidden 64, vocab {vocab}) with a SentencePiece tokenizer in {a.out}")
