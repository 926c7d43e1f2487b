"""Rewrite README.md's config table from the schema (ppllm/config.py); tests/test_config.py checks it."""
import os

from ppllm.config import describe_config

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

text = open(README).read()
start = text.index("\n", text.index("<!-- config-table")) + 1
end = text.index("<!-- /config-table -->")
open(README, "w").write(text[:start] + describe_config() + "\n" + text[end:])
print(f"README.md: config table rewritten ({len(describe_config().splitlines()) - 2} keys)")
