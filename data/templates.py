"""Prompt templates: one piece of code renders training samples and inference prompts.

A template turns a sample into *parts*, a flat list of
  * ``(text_or_ids, trained)``: a string (encoded later, in batches) or literal token ids;
    ``trained`` marks tokens the model must learn to produce;
  * ``CUT``: a turn boundary where an overlong sample may be truncated cleanly;
  * ``Target(id)``: the label of the previous position is ``id`` although the next input
    token is something else (baichuan2 learns EOS where the next user turn starts).

``encode_parts`` resolves the strings and returns ids + *shifted* labels (``labels[i]`` is
what position ``i`` must predict, -100 = nothing).  ``chat_prompt`` renders the same
parts for a conversation that ends with a user turn, plus the assistant cue: the ids a
model is given at inference.  So training and inference cannot diverge.

Conversations reach a template as a ``Dialog``: a list of messages
  ("user", text) | ("assistant", text) | ("call", thought, api_name, api_param) |
  ("observation", api_result)
plus an optional system text and tool description.  A template built with a run-level
``system_prompt`` uses it for every conversation that brings no system text of its own.

``chat_template()`` writes the same inference format as a Jinja template for
``tokenizer_config.json`` (``apply_chat_template``, vLLM, TGI, llama.cpp); ``pick_chat_template``
chooses the variant whose rendering, tokenized by the exported tokenizer, gives exactly
``chat_prompt``'s ids.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from .tokenizer import CHATGLM3_SPECIALS


class _Cut:
    def __repr__(self) -> str:
        return "CUT"


CUT = _Cut()


@dataclass(frozen=True)
class Target:
    id: int


@dataclass
class Dialog:
    messages: list[tuple]
    system: str | None = None
    tools: str | None = None


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]                     # shifted: labels[i] is the target after token i
    cuts: list[int] = field(default_factory=list)
    trained: int | None = None            # labels that are not -100, when the encoder counted them


TOOLS_INTRO = "You can call the following tools:"
# chatglm3's own wording (its build_chat_input demo and tool fine-tune format), followed by the tools as JSON
CHATGLM3_TOOLS_INTRO = "Answer the following questions as best as you can. You have access to the following tools:"
# bumped whenever a template renders different ids for the same sample: part of the data cache key
RENDER_VERSION = 2


def rounds_to_messages(rounds: list) -> list[tuple]:
    """``[[role, content], ...]`` in the sample format (ask / ans / ans-api) -> messages.

    Consecutive asks (or answers) are one turn, joined by a newline.  Accepts user /
    assistant as role names too, for inference callers.
    """
    msgs: list[tuple] = []
    for role, content in rounds:
        if role in ("ask", "user"):
            if msgs and msgs[-1][0] == "user":
                msgs[-1] = ("user", msgs[-1][1] + "\n" + content)
            else:
                msgs.append(("user", content))
        elif role in ("ans", "assistant"):
            if msgs and msgs[-1][0] == "assistant":
                msgs[-1] = ("assistant", msgs[-1][1] + "\n" + content)
            else:
                msgs.append(("assistant", content))
        elif role == "ans-api":
            for act in content.get("actions", []):
                msgs.append(("call", act.get("inner_thought") or "", act["api_name"], act["api_param"]))
                msgs.append(("observation", act["api_res"]))
            msgs.append(("assistant", content["ans"]))
        else:
            raise ValueError(f"unknown role {role!r}")
    return msgs


def react_call(thought: str, name: str, param: str) -> str:
    """Tool calls for families without a native format (ReAct style, trained)."""
    head = f"{thought}\n" if thought else ""
    return f"{head}Action: {name}\nAction Input: {param}\n"


def react_observation(result: str) -> str:
    return f"Observation: {result}\n"


def encode_parts(tok, many: list[list]) -> list[Encoded]:
    """Encode the strings of many part lists in one tokenizer batch, then assemble."""
    texts = [p[0] for parts in many for p in parts if isinstance(p, tuple) and isinstance(p[0], str)]
    encoded = iter(tok.encode_batch(texts))
    out = []
    for parts in many:
        ids: list[int] = []
        labels: list[int] = []
        cuts: list[int] = []
        n_trained = 0  # every label written below over a -100 or appended as a token is one trained label
        for p in parts:
            if p is CUT:
                cuts.append(len(ids))
                continue
            if isinstance(p, Target):
                if labels:
                    n_trained += labels[-1] == -100
                    labels[-1] = p.id
                continue
            payload, trained = p
            toks = next(encoded) if isinstance(payload, str) else payload
            if not toks:
                continue
            if trained:
                if labels:
                    n_trained += labels[-1] == -100
                    labels[-1] = toks[0]
                labels.extend(toks[1:])
                n_trained += len(toks) - 1
                labels.append(-100)
            else:
                labels.extend([-100] * len(toks))
            ids.extend(toks)
        out.append(Encoded(ids, labels, cuts, n_trained))
    return out


class Template:
    name = "base"

    def __init__(self, tok, system_prompt: str | None = None):
        self.tok = tok
        self.system_prompt = system_prompt or None

    def cache_tag(self) -> str:
        """What decides the rendering besides the tokenizer: the data cache key includes it."""
        tag = f"{self.name}/r{RENDER_VERSION}"
        if self.system_prompt:
            import hashlib
            tag += "/sys" + hashlib.sha256(self.system_prompt.encode()).hexdigest()[:12]
        return tag

    # -- training -------------------------------------------------------------------------
    def pretrain_parts(self, text: str) -> list:
        return self._bos() + [(text, True), (self._eos(), True)]

    def instruct_parts(self, instruct: str, input: str | None, output: str | None,
                       system: str | None = None) -> list:
        return self.dialog_parts(self.instruct_dialog(instruct, input, output, system))

    def dialog_parts(self, d: Dialog) -> list:
        raise NotImplementedError

    @staticmethod
    def instruct_dialog(instruct: str, input: str | None, output: str | None, system: str | None = None) -> Dialog:
        user = f"{instruct}\n{input}" if input else instruct
        msgs = [("user", user)] + ([("assistant", output)] if output is not None else [])
        return Dialog(msgs, system)

    def encode(self, parts: list) -> Encoded:
        return encode_parts(self.tok, [parts])[0]

    # -- inference ------------------------------------------------------------------------
    def chat_prompt(self, rounds: list, system: str | None = None, tools: str | None = None) -> list[int]:
        """Ids for a conversation ending with a user turn, up to where the model answers."""
        msgs = rounds_to_messages(rounds)
        if not msgs or msgs[-1][0] not in ("user", "observation"):
            raise ValueError("chat_prompt: the conversation must end with a user turn (ask)")
        return self.encode(self.dialog_parts(Dialog(msgs, system, tools)) + self.cue()).ids

    def instruct_prompt_ids(self, instruct: str, input: str | None = None, system: str | None = None) -> list[int]:
        return self.encode(self.instruct_parts(instruct, input, None, system) + self.cue()).ids

    def cue(self) -> list:
        """Parts that open the assistant turn when a template renders them separately."""
        return []

    def stop_ids(self) -> list[int]:
        """Generation stops on any of these."""
        return self._eos()

    def prompt_ids(self, prompt: str) -> list[int]:
        """BOS (by the tokenizer's convention) + a plain-text prompt; continuation prompts."""
        return self.encode(self._bos() + [(prompt, False)]).ids

    # -- helpers --------------------------------------------------------------------------
    def _bos(self) -> list:
        return [([self.tok.bos_id], False)] if getattr(self.tok, "adds_bos", False) else []

    def _eos(self) -> list[int]:
        return [self.tok.eos_id] if self.tok.eos_id is not None else []

    def _special(self, token: str) -> int:
        tid = self.tok.token_to_id(token)
        if tid is None:
            raise ValueError(f"template {self.name}: the tokenizer has no {token!r} token")
        return tid

    def system_of(self, d: Dialog) -> str | None:
        """The dialog's own system text, else the run's ``system_prompt``."""
        return d.system or self.system_prompt

    def system_text(self, d: Dialog) -> str | None:
        """System text plus the tool description, for templates without a native tool format."""
        pieces = [p for p in (self.system_of(d), f"{TOOLS_INTRO}\n{d.tools}" if d.tools else None) if p]
        return "\n\n".join(pieces) if pieces else None

    # -- export ---------------------------------------------------------------------------
    def chat_template(self, variant: int = 0) -> str | None:
        """A Jinja chat template rendering system/user/assistant messages as ``chat_prompt`` does.
        ``variant`` > 0 are alternative spellings for tokenizers that treat text after a special
        token differently (see ``pick_chat_template``); None when there are no more."""
        return None

    def _token(self, tid: int) -> str:
        return self.tok.id_to_token(tid)

    def _jinja_system(self) -> str:
        """Jinja that sets ``system`` (the first message when it is a system message, else the run's
        system_prompt) and ``msgs`` (the rest); a system message elsewhere is an error."""
        default = json.dumps(self.system_prompt) if self.system_prompt else "none"
        return ("{%- if messages and messages[0]['role'] == 'system' -%}"
                "{%- set system = messages[0]['content'] -%}{%- set msgs = messages[1:] -%}"
                "{%- else -%}{%- set system = " + default + " -%}{%- set msgs = messages -%}{%- endif -%}"
                "{%- for m in msgs -%}{%- if m['role'] not in ['user', 'assistant'] -%}"
                "{{- raise_exception('ppllm " + self.name + " chat template: only a leading system message, then "
                "user and assistant messages are supported, got role ' + m['role']) -}}"
                "{%- endif -%}{%- endfor -%}")


class PlainTemplate(Template):
    """A readable format for base models without a chat format (bloom, base llama, ...)."""
    name = "plain"

    def instruct_prompt(self, instruct: str, input: str | None = None) -> str:
        if input:
            return f"### Instruction:\n{instruct}\n\n### Input:\n{input}\n\n### Response:\n"
        return f"### Instruction:\n{instruct}\n\n### Response:\n"

    def instruct_parts(self, instruct: str, input: str | None, output: str | None,
                       system: str | None = None) -> list:
        parts = self._bos()
        system = system or self.system_prompt
        if system:
            parts.append((f"### System:\n{system}\n\n", False))
        parts.append((self.instruct_prompt(instruct, input), False))
        return parts + ([(output, True), (self._eos(), True)] if output is not None else [])

    def dialog_parts(self, d: Dialog) -> list:
        parts = self._bos()
        system = self.system_text(d)
        if system:
            parts.append((f"### System:\n{system}\n\n", False))
        for m in d.messages:
            if m[0] == "user":
                parts.append((f"### User:\n{m[1]}\n\n### Assistant:\n", False))
            elif m[0] == "assistant":
                parts += [(m[1], True), (self._eos(), True), CUT]
            elif m[0] == "call":
                parts.append((react_call(*m[1:]), True))
            else:
                parts.append((react_observation(m[1]), False))
        return parts

    def chat_template(self, variant: int = 0) -> str | None:
        if variant:
            return None
        bos = _lit(self._token(self.tok.bos_id)) if self._bos() else "''"
        eos = _lit("".join(self._token(i) for i in self._eos()))
        return (self._jinja_system() + "{{- " + bos + " -}}"
                "{%- if system -%}{{- '### System:\\n' + system + '\\n\\n' -}}{%- endif -%}"
                "{%- for m in msgs -%}{%- if m['role'] == 'user' -%}"
                "{{- '### User:\\n' + m['content'] + '\\n\\n### Assistant:\\n' -}}"
                "{%- else -%}{{- m['content'] + " + eos + " -}}{%- endif -%}{%- endfor -%}")


class Llama2Template(Template):
    """llama-2-chat, as Meta's ``chat_completion`` builds it: per round ``<s>`` +
    "[INST] {user} [/INST]" + " {answer} " + ``</s>``.  The system text becomes
    ``<<SYS>>\n{system}\n<</SYS>>\n\n`` in front of the first user message, and that combined
    text is stripped once (not the system and user texts separately).  ``[INST]`` is plain text."""
    name = "llama2"

    def instruct_prompt(self, instruct: str, input: str | None = None) -> str:
        user = f"{instruct}\n{input}" if input else instruct
        return f"[INST] {user.strip()} [/INST]"

    def dialog_parts(self, d: Dialog) -> list:
        parts = []
        system = self.system_text(d)
        bos = [self.tok.bos_id] if self.tok.bos_id is not None else []
        for m in d.messages:
            if m[0] == "user":
                text = m[1]
                if system:
                    text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{text}"
                    system = None
                parts += [(bos, False), (f"[INST] {text.strip()} [/INST]", False)]
            elif m[0] == "assistant":
                parts += [(f"{m[1].strip()} ", True), (self._eos(), True), CUT]
            elif m[0] == "call":
                parts.append((react_call(*m[1:]), True))
            else:
                parts.append((react_observation(m[1]), False))
        return parts

    def chat_template(self, variant: int = 0) -> str | None:
        # variant 1: for tokenizers that add no word-start marker to text right after a special
        # token (transformers' LlamaTokenizer with legacy=False), where Meta's per-round encode has one
        if variant > 1:
            return None
        bos = _lit((self._token(self.tok.bos_id) if self.tok.bos_id is not None else "") + (" " if variant else ""))
        eos = _lit("".join(self._token(i) for i in self._eos()))
        return (self._jinja_system() + "{%- for m in msgs -%}{%- if m['role'] == 'user' -%}"
                "{%- if loop.first and system -%}"
                "{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + m['content'] -%}"
                "{%- else -%}{%- set content = m['content'] -%}{%- endif -%}"
                "{{- " + bos + " + '[INST] ' + content.strip() + ' [/INST]' -}}"
                "{%- else -%}{{- ' ' + m['content'].strip() + ' ' + " + eos + " -}}{%- endif -%}"
                "{%- endfor -%}")


class Llama3Template(Template):
    """llama-3-instruct: ``<|begin_of_text|>`` then per message
    ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``."""
    name = "llama3"

    def __init__(self, tok, system_prompt: str | None = None):
        super().__init__(tok, system_prompt)
        self.bot = self._special("<|begin_of_text|>")
        self.sh, self.eh = self._special("<|start_header_id|>"), self._special("<|end_header_id|>")
        self.eot = self._special("<|eot_id|>")
        self.eot_text = tok.token_to_id("<|end_of_text|>") or tok.eos_id

    def _header(self, role: str) -> list:
        return [([self.sh], False), (role, False), ([self.eh], False), ("\n\n", False)]

    def pretrain_parts(self, text: str) -> list:
        return [([self.bot], False), (text, True), ([self.eot_text], True)]

    def dialog_parts(self, d: Dialog) -> list:
        parts = [([self.bot], False)]
        system = self.system_text(d)
        if system:
            parts += self._header("system") + [(system.strip(), False), ([self.eot], False)]
        in_turn = False
        for m in d.messages:
            if m[0] == "user":
                parts += self._header("user") + [(m[1].strip(), False), ([self.eot], False)]
                continue
            if not in_turn and m[0] in ("assistant", "call"):
                parts += self._header("assistant")
                in_turn = True
            if m[0] == "assistant":
                parts += [(m[1].strip(), True), ([self.eot], True), CUT]
                in_turn = False
            elif m[0] == "call":
                parts.append((react_call(*m[1:]), True))
            else:
                parts.append((react_observation(m[1]), False))
        return parts

    def cue(self) -> list:
        return self._header("assistant")

    def stop_ids(self) -> list[int]:
        return [self.eot, self.eot_text]

    def chat_template(self, variant: int = 0) -> str | None:
        if variant:
            return None
        bot, sh, eh, eot = (_lit(self._token(i)) for i in (self.bot, self.sh, self.eh, self.eot))
        return (self._jinja_system() + "{{- " + bot + " -}}"
                "{%- if system -%}{{- " + sh + " + 'system' + " + eh + " + '\\n\\n' + system.strip() + " + eot +
                " -}}{%- endif -%}"
                "{%- for m in msgs -%}{{- " + sh + " + m['role'] + " + eh + " + '\\n\\n' + m['content'].strip() + "
                + eot + " -}}{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{- " + sh + " + 'assistant' + " + eh + " + '\\n\\n' -}}{%- endif -%}")


class ChatMLTemplate(Template):
    """ChatML, qwen2's own format: per message ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; the
    prompt ends with ``<|im_start|>assistant\\n``.  The answer and its ``<|im_end|>`` are trained.
    No system message is added unless the sample or the run's ``system_prompt`` gives one (Qwen2's
    own chat template adds "You are a helpful assistant."; set ``system_prompt`` to that to match)."""
    name = "chatml"

    def __init__(self, tok, system_prompt: str | None = None):
        super().__init__(tok, system_prompt)
        self.ims, self.ime = self._special("<|im_start|>"), self._special("<|im_end|>")

    def _open(self, role: str) -> list:
        return [([self.ims], False), (f"{role}\n", False)]

    def _close(self, trained: bool) -> list:
        return [([self.ime], trained), ("\n", False)]

    def dialog_parts(self, d: Dialog) -> list:
        parts = self._bos()
        system = self.system_text(d)
        if system:
            parts += self._open("system") + [(system, False)] + self._close(False)
        in_turn = False
        for m in d.messages:
            if m[0] == "user":
                parts += self._open("user") + [(m[1], False)] + self._close(False)
                continue
            if not in_turn and m[0] in ("assistant", "call"):
                parts += self._open("assistant")
                in_turn = True
            if m[0] == "assistant":
                parts += [(m[1], True)] + self._close(True) + [CUT]
                in_turn = False
            elif m[0] == "call":
                parts.append((react_call(*m[1:]), True))
            else:
                parts.append((react_observation(m[1]), False))
        return parts

    def cue(self) -> list:
        return self._open("assistant")

    def stop_ids(self) -> list[int]:
        return [self.ime] + [i for i in self._eos() if i != self.ime]

    def chat_template(self, variant: int = 0) -> str | None:
        if variant:
            return None
        ims, ime = _lit(self._token(self.ims)), _lit(self._token(self.ime))
        bos = _lit(self._token(self.tok.bos_id)) if self._bos() else "''"
        return (self._jinja_system() + "{{- " + bos + " -}}"
                "{%- if system -%}{{- " + ims + " + 'system\\n' + system + " + ime + " + '\\n' -}}{%- endif -%}"
                "{%- for m in msgs -%}{{- " + ims + " + m['role'] + '\\n' + m['content'] + " + ime + " + '\\n' -}}"
                "{%- endfor -%}{%- if add_generation_prompt -%}{{- " + ims + " + 'assistant\\n' -}}{%- endif -%}")


class ChatGLM3Template(Template):
    """chatglm3: ``[gMASK] sop`` then per message ``<|role|>`` + encode(metadata + "\\n") +
    encode(content); no EOS between turns.  An answer is trained together with the role
    token that follows it (the model's stop signal), or EOS at the very end.  Tools go
    into the system turn as JSON after the release's own intro (``CHATGLM3_TOOLS_INTRO``,
    or the system text when there is one); a call is an assistant message whose metadata
    is the API name; its result is an ``<|observation|>`` message."""
    name = "chatglm3"

    def __init__(self, tok, system_prompt: str | None = None):
        super().__init__(tok, system_prompt)
        self.ids = {name: self._special(name) for name in CHATGLM3_SPECIALS}

    def _prefix(self) -> list:
        return [([self.ids["[gMASK]"], self.ids["sop"]], False)]

    def pretrain_parts(self, text: str) -> list:
        return self._prefix() + [(text, True), (self._eos(), True)]

    def _block(self, role: str, meta: str, content: str, trained: bool, after_answer: bool) -> list:
        return [([self.ids[f"<|{role}|>"]], after_answer), (meta + "\n", trained), (content, trained)]

    @staticmethod
    def tool_call(name: str, param: str) -> str:
        try:
            args = json.loads(param)
        except (TypeError, ValueError):
            args = None
        if not isinstance(args, dict):
            return param
        return "```python\ntool_call(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")\n```"

    def dialog_parts(self, d: Dialog) -> list:
        parts = self._prefix()
        system = self.system_of(d)
        if system or d.tools:
            content = system or ""
            if d.tools:
                try:
                    tools = json.dumps(json.loads(d.tools), indent=4, ensure_ascii=False)
                except ValueError:
                    tools = d.tools
                content = f"{content or CHATGLM3_TOOLS_INTRO}\n{tools}"
            parts += self._block("system", "", content, False, False)
        after = False  # the previous message was trained (assistant text or a call)
        for m in d.messages:
            if m[0] == "user":
                if after:
                    parts.append(CUT)
                parts += self._block("user", "", m[1], False, after)
                after = False
            elif m[0] == "assistant":
                parts += self._block("assistant", "", m[1], True, after)
                after = True
            elif m[0] == "call":
                if m[1]:
                    parts += self._block("assistant", "", m[1], True, after)
                    after = True
                parts += self._block("assistant", m[2], self.tool_call(m[2], m[3]), True, after)
                after = True
            else:
                parts += self._block("observation", "", m[1], False, after)
                after = False
        if after:
            parts.append((self._eos(), True))
        return parts

    def cue(self) -> list:
        return [([self.ids["<|assistant|>"]], False)]

    def stop_ids(self) -> list[int]:
        return self._eos() + [self.ids["<|user|>"], self.ids["<|observation|>"]]

    def chat_template(self, variant: int = 0) -> str | None:
        # "\n " + content: the SentencePiece encoding of "\n" followed by that of the content (whose
        # word-start marker is the space), as chatglm3's own chat template writes it
        if variant:
            return None
        return (self._jinja_system() + "{{- '[gMASK]sop' -}}"
                "{%- if system -%}{{- '<|system|>\\n ' + system -}}{%- endif -%}"
                "{%- for m in msgs -%}{{- '<|' + m['role'] + '|>\\n ' + m['content'] -}}{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}")


class Baichuan2Template(Template):
    """baichuan2-chat: the system text first (no separator, as the release's ``build_chat_input``),
    then ``195`` + user ids, ``196`` + assistant ids, EOS at the end, no BOS.  As in the official
    fine-tune, the last answer token of each turn learns EOS (the next input token is 195), and
    196 is not trained."""
    name = "baichuan2"

    def __init__(self, tok, system_prompt: str | None = None):
        super().__init__(tok, system_prompt)
        gen = getattr(tok, "generation_config", {}) or {}
        self.user_id = int(gen.get("user_token_id", 195))
        self.assistant_id = int(gen.get("assistant_token_id", 196))

    def dialog_parts(self, d: Dialog) -> list:
        parts = self._bos()
        system = self.system_text(d)
        if system:
            parts.append((system, False))
        in_turn = answered = False
        for m in d.messages:
            if m[0] == "user":
                if answered:
                    parts.append(Target(self.tok.eos_id))
                parts += [([self.user_id], False), (m[1], False)]
                in_turn = answered = False
                continue
            if not in_turn and m[0] in ("assistant", "call"):
                parts.append(([self.assistant_id], False))
                in_turn = True
            if m[0] == "assistant":
                parts += [(m[1], True), CUT]
                in_turn, answered = False, True
            elif m[0] == "call":
                parts.append((react_call(*m[1:]), True))
            else:
                parts.append((react_observation(m[1]), False))
        if answered:
            parts.append((self._eos(), True))
        return parts

    def cue(self) -> list:
        return [([self.assistant_id], False)]

    def chat_template(self, variant: int = 0) -> str | None:
        if variant:
            return None
        user, asst = _lit(self._token(self.user_id)), _lit(self._token(self.assistant_id))
        bos = _lit(self._token(self.tok.bos_id)) if self._bos() else "''"
        return (self._jinja_system() + "{{- " + bos + " -}}{%- if system -%}{{- system -}}{%- endif -%}"
                "{%- for m in msgs -%}{%- if m['role'] == 'user' -%}{{- " + user + " + m['content'] -}}"
                "{%- else -%}{{- " + asst + " + m['content'] -}}{%- endif -%}{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{- " + asst + " -}}{%- endif -%}")


def _lit(text: str) -> str:
    """A Jinja string literal."""
    return json.dumps(text)


TEMPLATES = {t.name: t for t in (PlainTemplate, Llama2Template, Llama3Template, ChatGLM3Template,
                                 Baichuan2Template, ChatMLTemplate)}


def auto_template_name(tok, model_type: str | None) -> str:
    """llama -> llama2 (llama3 when the tokenizer has the header tokens); qwen2 -> chatml;
    chatglm -> chatglm3; baichuan -> baichuan2; bloom and everything else -> plain."""
    mt = (model_type or "").lower()
    if mt in ("llama", "mistral"):
        return "llama3" if tok.token_to_id("<|start_header_id|>") is not None else "llama2"
    if mt == "qwen2":
        return "chatml"
    if mt == "chatglm":
        return "chatglm3"
    if mt == "baichuan":
        return "baichuan2"
    return "plain"


def get_template(name: str, tok, model_type: str | None = None, system_prompt: str | None = None) -> Template:
    """The template ``name`` (or the family's own for ``auto``); ``system_prompt`` is the run-level
    system text used when a conversation has none."""
    if name == "auto":
        name = auto_template_name(tok, model_type)
    if name not in TEMPLATES:
        raise ValueError(f"template {name!r} is not available; choose one of {sorted(TEMPLATES)} or auto")
    return TEMPLATES[name](tok, system_prompt)


# -- chat messages (OpenAI / transformers style) -------------------------------------------------


def messages_to_dialog(messages: list[dict]) -> Dialog:
    """``[{"role": "system"|"user"|"assistant", "content": ...}, ...]`` -> Dialog (inference side)."""
    system = None
    msgs: list[tuple] = []
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "system":
            if i:
                raise ValueError("a system message must come first")
            system = content
        elif role in ("user", "assistant"):
            if msgs and msgs[-1][0] == role:  # consecutive turns of one side are one turn
                msgs[-1] = (role, msgs[-1][1] + "\n" + content)
            else:
                msgs.append((role, content))
        else:
            raise ValueError(f"unknown role {role!r}; expected system, user or assistant")
    return Dialog(msgs, system)


def messages_prompt(template: Template, messages: list[dict]) -> list[int]:
    """Inference ids for chat messages ending with a user message (the assistant cue included)."""
    d = messages_to_dialog(messages)
    if not d.messages or d.messages[-1][0] != "user":
        raise ValueError("the conversation must end with a user message")
    return template.encode(template.dialog_parts(d) + template.cue()).ids


def render_chat_template(jinja: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render with transformers' own chat-template renderer (its sandboxed Jinja environment)."""
    from transformers.utils.chat_template_utils import render_jinja_template
    rendered, _ = render_jinja_template(conversations=[messages], chat_template=jinja,
                                        add_generation_prompt=add_generation_prompt)
    return rendered[0]


PROBE_CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "What is a quay?"}],
    [{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "  Hi  "},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a river."}],
]


def pick_chat_template(template: Template, encode_chat, chats: list | None = None) -> tuple[str | None, bool]:
    """The first ``chat_template`` variant for which ``encode_chat(jinja, messages)`` gives exactly
    ``messages_prompt`` for every probe chat: ``(jinja, True)``; ``(variant 0, False)`` when none does."""
    first = None
    for variant in range(8):
        jinja = template.chat_template(variant)
        if jinja is None:
            break
        first = first or jinja
        if all(encode_chat(jinja, c) == messages_prompt(template, c) for c in chats or PROBE_CHATS):
            return jinja, True
    return first, False
