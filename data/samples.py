"""The sample stream format (REFERENCE §3) and its validation.

``check(obj)`` validates one record and returns ``(type, payload)`` ready for a template,
or raises ``SampleError(reason, message)``.  ``reason`` is a short, stable category
(counted per reason when ``strict: false`` skips bad samples); ``message`` says what is
wrong and is prefixed with ``FILE:LINE`` by the reader.

  pretrain        text                          every token trained
  instruct        instruct, input?, output      output (+ EOS) trained
  conversation    rounds [[ask|ans, text]...]   ans turns trained
  conver_has_api  api_desc, rounds (+ ans-api)  thoughts, calls, answers trained; API results not
  ref_qa          reference, rounds             ans turns trained; the reference is not

Formats other tools write are read natively, recognised by their main field when ``type`` is
absent (or named by ``type``), and mapped onto the same messages, rendering and label rules
(a record with ``text`` and none of these fields is a ``pretrain`` document):

  messages        OpenAI chat: messages [{role: system|user|assistant|tool, content, tool_calls?}],
                  tools?                        assistant turns and tool calls trained; tool results not
  sharegpt        conversations [{from: system|human|gpt|function_call|observation, value}],
                  system?, tools?               gpt turns and function calls trained
  alpaca          instruction, input?, output, system?, history? [[q, a], ...]   the answers trained

Every chat type takes an optional per-sample ``system`` text (OpenAI: a leading system message);
without one the template uses the run's ``system_prompt``.
"""
from __future__ import annotations

import difflib
import json

from .templates import Dialog, Template, rounds_to_messages

# the order is stored in the data cache (a kind is its index): append only
SAMPLE_TYPES = ("pretrain", "instruct", "conversation", "conver_has_api", "ref_qa", "messages", "sharegpt", "alpaca")
FORMAT_FIELDS = {"messages": "messages", "conversations": "sharegpt", "instruction": "alpaca"}
REFERENCE_HEAD = "Reference:\n"
# fields each type reads; a key that is a near miss of one of these is reported ("did you mean")
KNOWN_FIELDS = {
    "pretrain": ("type", "text"),
    "instruct": ("type", "instruct", "input", "output", "system"),
    "conversation": ("type", "rounds", "system"),
    "conver_has_api": ("type", "api_desc", "rounds", "system"),
    "ref_qa": ("type", "reference", "rounds", "system"),
    "messages": ("type", "messages", "tools", "system"),
    "sharegpt": ("type", "conversations", "system", "tools"),
    "alpaca": ("type", "instruction", "input", "output", "system", "history"),
}
OPENAI_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "call", "observation": "observation", "system": "system"}


class SampleError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def did_you_mean(word: str, choices, cutoff: float = 0.6) -> str:
    """"; did you mean 'x'?" for the closest choice, or ""."""
    m = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=cutoff)
    return f"; did you mean {m[0]!r}?" if m else ""


def _near_key(obj: dict, key: str) -> str:
    """"; the record has 'instruction': did you mean 'instruct'?" when a present key is a near miss."""
    m = difflib.get_close_matches(key, [k for k in obj if isinstance(k, str)], n=1, cutoff=0.7)
    return f"; the record has {m[0]!r}: did you mean {key!r}?" if m else ""


def _check_near_misses(obj: dict, kind: str) -> None:
    """Unknown keys are allowed (ids, metadata), but not a misspelt field, which would be ignored."""
    known = KNOWN_FIELDS[kind]
    for k in obj:
        if isinstance(k, str) and k not in known:
            m = difflib.get_close_matches(k, known, n=1, cutoff=0.8)
            if m and m[0] not in obj:
                raise SampleError("unknown field", f"unknown field {k!r} in a {kind} sample; did you mean {m[0]!r}?")


def _system(obj: dict) -> str | None:
    v = obj.get("system")
    if v is None:
        return None
    if not isinstance(v, str):
        raise SampleError("wrong field type", f"field 'system' must be a string, got {type(v).__name__}")
    return v if v.strip() else None


def _text(obj: dict, key: str, what: str | None = None) -> str:
    what = what or f"field {key!r}"
    if key not in obj or obj[key] is None:
        raise SampleError("missing field", f"{what} must be a non-empty string (it is missing{_near_key(obj, key)})")
    v = obj[key]
    if not isinstance(v, str):
        raise SampleError("wrong field type", f"{what} must be a non-empty string, got {type(v).__name__}")
    if not v.strip():
        raise SampleError("empty field", f"{what} must be a non-empty string (it is empty)")
    return v


def _action(a, where: str) -> None:
    if not isinstance(a, dict):
        raise SampleError("bad api action", f"{where} must be an object with inner_thought, api_name, api_param, "
                                            f"api_res; got {type(a).__name__}")
    _text(a, "api_name", f"{where}.api_name")
    th = a.get("inner_thought")
    if th is not None and not isinstance(th, str):
        raise SampleError("wrong field type", f"{where}.inner_thought must be a string, got {type(th).__name__}")
    if "api_param" not in a:
        raise SampleError("missing field", f"{where}.api_param is missing; it must be a JSON string")
    p = a["api_param"]
    if not isinstance(p, str):
        raise SampleError("api_param not a JSON string",
                          f"{where}.api_param must be a JSON string (e.g. \"{{\\\"q\\\": 1}}\"), got a JSON "
                          f"{type(p).__name__}; write it with json.dumps")
    try:
        json.loads(p)
    except ValueError as e:
        raise SampleError("api_param not a JSON string", f"{where}.api_param is not valid JSON ({e})")
    if "api_res" not in a:
        raise SampleError("missing field", f"{where}.api_res is missing")
    if not isinstance(a["api_res"], str):
        raise SampleError("wrong field type", f"{where}.api_res must be a string, got "
                                              f"{type(a['api_res']).__name__}")


def _rounds(obj: dict, allow_api: bool) -> list:
    rounds = obj.get("rounds")
    if not isinstance(rounds, list) or not rounds:
        got = "missing" if rounds is None else ("empty" if rounds == [] else type(rounds).__name__)
        hint = _near_key(obj, "rounds") if rounds is None else ""
        for field, fmt in FORMAT_FIELDS.items():
            if rounds is None and field in obj:
                hint = f"; the record has {field!r}: remove 'type' to read it as {fmt}"
        raise SampleError("bad rounds", f"field 'rounds' must be a non-empty list of [role, text] pairs ({got}{hint})")
    roles = ("ask", "ans", "ans-api") if allow_api else ("ask", "ans")
    for i, r in enumerate(rounds, 1):
        if not isinstance(r, list) or len(r) != 2:
            raise SampleError("bad rounds", f"round {i} must be a [role, text] pair, got {json.dumps(r)[:60]}")
        role, content = r
        if role not in roles:
            hint = "; ans-api is only allowed in conver_has_api samples" if role == "ans-api" else ""
            raise SampleError("unknown role", f"round {i}: unknown role {role!r}; expected one of "
                                              f"{', '.join(roles)}{hint}")
        if role == "ans-api":
            if not isinstance(content, dict):
                raise SampleError("bad api action", f"round {i}: an ans-api turn must be an object "
                                                    f"{{actions, ans}}, got {type(content).__name__}")
            acts = content.get("actions")
            if not isinstance(acts, list):
                raise SampleError("bad api action", f"round {i}: ans-api 'actions' must be a list")
            for j, a in enumerate(acts, 1):
                _action(a, f"round {i} action {j}")
            _text(content, "ans", f"round {i}: ans-api 'ans'")
        elif not isinstance(content, str) or not content.strip():
            raise SampleError("empty field" if isinstance(content, str) else "wrong field type",
                              f"round {i} ({role}): the text must be a non-empty string")
    if rounds[0][0] != "ask":
        raise SampleError("bad round order", f"round 1 is {rounds[0][0]!r}; a conversation starts with 'ask'")
    if not any(r[0] != "ask" for r in rounds):
        raise SampleError("nothing to train", "no 'ans' round: nothing to train on")
    while rounds[-1][0] == "ask":  # a trailing question has no answer to learn from
        rounds = rounds[:-1]
    return rounds


def check(obj) -> tuple[str, object]:
    """Validate one record; ``(type, payload)`` or SampleError."""
    if not isinstance(obj, dict):
        raise SampleError("not an object", f"a sample must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if kind is None:
        kind = next((fmt for field, fmt in FORMAT_FIELDS.items() if field in obj), None)
    if kind is None and "text" in obj:
        kind = "pretrain"  # a bare text record (FineWeb, RedPajama, the Pile): a pretraining document
    if kind not in SAMPLE_TYPES:
        reason = "missing type" if kind is None else "unknown type"
        expected = (f"expected one of {', '.join(SAMPLE_TYPES[:5])}, or a record with 'messages' (OpenAI), "
                    f"'conversations' (ShareGPT) or 'instruction' (Alpaca) and no 'type'")
        if kind is None:
            keys = [k for k in obj if isinstance(k, str)]
            hint = next((f"; the record has {k!r}: did you mean {m[0]!r}?" for k in keys
                         for m in [difflib.get_close_matches(k, ["type", *FORMAT_FIELDS], n=1, cutoff=0.7)] if m), "")
        else:
            hint = did_you_mean(kind, SAMPLE_TYPES)
        raise SampleError(reason, f"unknown or missing 'type' {kind!r}; {expected}{hint}")
    _check_near_misses(obj, kind)
    if kind == "pretrain":
        return kind, _text(obj, "text")
    system = _system(obj)
    if kind in ("instruct", "alpaca"):
        field = "instruct" if kind == "instruct" else "instruction"
        ins = _text(obj, field)
        inp = obj.get("input")
        if inp is not None and not isinstance(inp, str):
            raise SampleError("wrong field type", f"field 'input' must be a string, got {type(inp).__name__}")
        inp = inp if inp and inp.strip() else None
        out = _text(obj, "output")
        if kind == "alpaca" and obj.get("history"):
            return kind, _alpaca_history(obj["history"], ins, inp, out, system)
        return kind, (ins, inp, out, system)
    if kind == "conversation":
        return kind, Dialog(rounds_to_messages(_rounds(obj, False)), system)
    if kind == "conver_has_api":
        desc = _text(obj, "api_desc")
        return kind, Dialog(rounds_to_messages(_rounds(obj, True)), system, tools=desc)
    if kind == "messages":
        return kind, _openai(obj, system)
    if kind == "sharegpt":
        return kind, _sharegpt(obj, system)
    ref = _text(obj, "reference")
    msgs = rounds_to_messages(_rounds(obj, False))
    msgs[0] = ("user", f"{REFERENCE_HEAD}{ref}\n\n{msgs[0][1]}")
    return kind, Dialog(msgs, system)


def _tools(obj: dict) -> str | None:
    """The tool description: a string, or a JSON list/object (written as JSON)."""
    t = obj.get("tools")
    if t is None or t == [] or t == "":
        return None
    if isinstance(t, str):
        return t
    if isinstance(t, (list, dict)):
        return json.dumps(t, ensure_ascii=False)
    raise SampleError("wrong field type", f"field 'tools' must be a list of tool schemas or a string, "
                                          f"got {type(t).__name__}")


def _arguments(args, where: str) -> str:
    """A call's arguments as a JSON string (OpenAI writes a string, transformers an object)."""
    if isinstance(args, (dict, list)):
        return json.dumps(args, ensure_ascii=False)
    if not isinstance(args, str):
        raise SampleError("wrong field type", f"{where} must be a JSON string or an object, got {type(args).__name__}")
    try:
        json.loads(args)
    except ValueError as e:
        raise SampleError("api_param not a JSON string", f"{where} is not valid JSON ({e})")
    return args


def _finish(msgs: list[tuple], what: str) -> list[tuple]:
    """The conversation rules of ``_rounds`` on mapped messages: starts with a user turn, has
    something to train, and a trailing user turn (no answer to learn) is dropped."""
    if not msgs or msgs[0][0] != "user":
        first = msgs[0][0] if msgs else "nothing"
        raise SampleError("bad round order", f"{what}: the conversation starts with {first!r}; it must start with "
                                             f"a user turn (after an optional system message)")
    if not any(m[0] in ("assistant", "call") for m in msgs):
        raise SampleError("nothing to train", f"{what}: no assistant turn: nothing to train on")
    while msgs[-1][0] == "user":
        msgs = msgs[:-1]
    if msgs[-1][0] == "call":
        raise SampleError("bad round order", f"{what}: the conversation ends with a tool call and no result")
    return msgs


def _add(msgs: list[tuple], role: str, text: str) -> None:
    """Consecutive user (or assistant) texts are one turn, joined by a newline, as in ``rounds``."""
    if msgs and msgs[-1][0] == role:
        msgs[-1] = (role, msgs[-1][1] + "\n" + text)
    else:
        msgs.append((role, text))


def _openai(obj: dict, system: str | None) -> Dialog:
    items = obj.get("messages")
    if not isinstance(items, list) or not items:
        got = "missing" if items is None else ("empty" if items == [] else type(items).__name__)
        raise SampleError("bad rounds", f"field 'messages' must be a non-empty list of {{role, content}} objects "
                                        f"({got})")
    msgs: list[tuple] = []
    for i, m in enumerate(items, 1):
        where = f"message {i}"
        if not isinstance(m, dict):
            raise SampleError("bad rounds", f"{where} must be an object {{role, content}}, got {type(m).__name__}")
        role = m.get("role")
        if role not in OPENAI_ROLES:
            hint = (f"; {role!r} is a ShareGPT role (messages use {SHAREGPT_ROLES[role]!r})"
                    if role in SHAREGPT_ROLES and SHAREGPT_ROLES[role] in OPENAI_ROLES
                    else did_you_mean(role, OPENAI_ROLES) if isinstance(role, str) else "")
            raise SampleError("unknown role", f"{where}: unknown or missing role {role!r}; expected one of "
                                              f"{', '.join(OPENAI_ROLES)}{hint}")
        for k in m:
            near = difflib.get_close_matches(k, ["role", "content", "tool_calls", "tool_call_id", "name"], 1, 0.8)
            if near and near[0] != k and near[0] not in m:
                raise SampleError("unknown field", f"{where}: unknown field {k!r}; did you mean {near[0]!r}?")
        if m.get("weight", 1) != 1:
            raise SampleError("unsupported", f"{where}: 'weight' {m['weight']!r} is not supported (every assistant "
                                             f"message is trained); remove the key or the message")
        content = m.get("content")
        calls = m.get("tool_calls") if role == "assistant" else None
        if content is not None and not isinstance(content, str):
            raise SampleError("wrong field type", f"{where} ({role}): 'content' must be a string, got "
                                                  f"{type(content).__name__}")
        if not (content and content.strip()) and not calls:
            raise SampleError("empty field", f"{where} ({role}): 'content' must be a non-empty string"
                                             f"{_near_key(m, 'content')}")
        if role == "system":
            if i != 1:
                raise SampleError("bad round order", f"{where}: a system message must be the first message")
            system = content
        elif role == "user":
            _add(msgs, "user", content)
        elif role == "tool":
            if not msgs or msgs[-1][0] not in ("call", "observation"):
                raise SampleError("bad round order", f"{where}: a tool message must follow an assistant message "
                                                     f"with tool_calls")
            msgs.append(("observation", content))
        elif calls is not None:
            if not isinstance(calls, list) or not calls:
                raise SampleError("bad api action", f"{where}: 'tool_calls' must be a non-empty list")
            for j, c in enumerate(calls, 1):
                cw = f"{where} tool_calls[{j}]"
                fn = c.get("function", c) if isinstance(c, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
                    raise SampleError("bad api action", f"{cw} must be {{\"function\": {{\"name\": ..., "
                                                        f"\"arguments\": ...}}}}")
                args = _arguments(fn.get("arguments", "{}"), f"{cw}.function.arguments")
                msgs.append(("call", (content or "") if j == 1 else "", fn["name"], args))
        else:
            _add(msgs, "assistant", content)
    return Dialog(_finish(msgs, "messages"), system, tools=_tools(obj))


def _sharegpt(obj: dict, system: str | None) -> Dialog:
    items = obj.get("conversations")
    if not isinstance(items, list) or not items:
        got = "missing" if items is None else ("empty" if items == [] else type(items).__name__)
        raise SampleError("bad rounds", f"field 'conversations' must be a non-empty list of {{from, value}} objects "
                                        f"({got})")
    msgs: list[tuple] = []
    for i, m in enumerate(items, 1):
        where = f"conversations {i}"
        if not isinstance(m, dict):
            raise SampleError("bad rounds", f"{where} must be an object {{from, value}}, got {type(m).__name__}")
        role = m.get("from")
        if role not in SHAREGPT_ROLES:
            hint = (did_you_mean(role, SHAREGPT_ROLES) if isinstance(role, str) else "") or (
                "; a ShareGPT turn is {\"from\": ..., \"value\": ...}" if "role" in m else "")
            raise SampleError("unknown role", f"{where}: unknown or missing 'from' {role!r}; expected one of "
                                              f"{', '.join(SHAREGPT_ROLES)}{hint}")
        value = m.get("value")
        if not isinstance(value, str) or not value.strip():
            raise SampleError("empty field" if isinstance(value, str) else "wrong field type",
                              f"{where} ({role}): 'value' must be a non-empty string{_near_key(m, 'value')}")
        kind = SHAREGPT_ROLES[role]
        if kind == "system":
            if i != 1:
                raise SampleError("bad round order", f"{where}: a system turn must be the first turn")
            system = value
        elif kind == "call":
            try:
                call = json.loads(value)
            except ValueError as e:
                raise SampleError("bad api action", f"{where}: a function_call value must be JSON "
                                                    f"{{\"name\", \"arguments\"}} ({e})")
            for j, c in enumerate(call if isinstance(call, list) else [call], 1):
                if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"].strip():
                    raise SampleError("bad api action", f"{where} call {j} must be {{\"name\": ..., "
                                                        f"\"arguments\": ...}}")
                msgs.append(("call", "", c["name"], _arguments(c.get("arguments", "{}"), f"{where} arguments")))
        elif kind == "observation":
            if not msgs or msgs[-1][0] not in ("call", "observation"):
                raise SampleError("bad round order", f"{where}: an observation must follow a function_call")
            msgs.append(("observation", value))
        else:
            _add(msgs, kind, value)
    return Dialog(_finish(msgs, "conversations"), system, tools=_tools(obj))


def _alpaca_history(history, ins: str, inp: str | None, out: str, system: str | None) -> Dialog:
    if not isinstance(history, list):
        raise SampleError("bad rounds", f"field 'history' must be a list of [question, answer] pairs, got "
                                        f"{type(history).__name__}")
    msgs: list[tuple] = []
    for i, pair in enumerate(history, 1):
        if (not isinstance(pair, list) or len(pair) != 2
                or not all(isinstance(x, str) and x.strip() for x in pair)):
            raise SampleError("bad rounds", f"history {i} must be a [question, answer] pair of non-empty strings")
        msgs += [("user", pair[0]), ("assistant", pair[1])]
    msgs += [("user", f"{ins}\n{inp}" if inp else ins), ("assistant", out)]
    return Dialog(msgs, system)


def parts_for(template: Template, kind: str, payload) -> list:
    if kind == "pretrain":
        return template.pretrain_parts(payload)
    if isinstance(payload, tuple):  # instruct, or alpaca without history
        return template.instruct_parts(*payload)
    return template.dialog_parts(payload)
