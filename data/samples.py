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
"""
from __future__ import annotations

import json

from .templates import Dialog, Template, rounds_to_messages

SAMPLE_TYPES = ("pretrain", "instruct", "conversation", "conver_has_api", "ref_qa")
REFERENCE_HEAD = "Reference:\n"


class SampleError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def _text(obj: dict, key: str, what: str | None = None) -> str:
    what = what or f"field {key!r}"
    if key not in obj or obj[key] is None:
        raise SampleError("missing field", f"{what} must be a non-empty string (it is missing)")
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
        raise SampleError("bad rounds", f"field 'rounds' must be a non-empty list of [role, text] pairs ({got})")
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
    if kind not in SAMPLE_TYPES:
        reason = "missing type" if kind is None else "unknown type"
        raise SampleError(reason, f"unknown or missing 'type' {kind!r}; expected one of {', '.join(SAMPLE_TYPES)}")
    if kind == "pretrain":
        return kind, _text(obj, "text")
    if kind == "instruct":
        ins = _text(obj, "instruct")
        inp = obj.get("input")
        if inp is not None and not isinstance(inp, str):
            raise SampleError("wrong field type", f"field 'input' must be a string, got {type(inp).__name__}")
        return kind, (ins, inp if inp and inp.strip() else None, _text(obj, "output"))
    if kind == "conversation":
        return kind, Dialog(rounds_to_messages(_rounds(obj, False)))
    if kind == "conver_has_api":
        desc = _text(obj, "api_desc")
        return kind, Dialog(rounds_to_messages(_rounds(obj, True)), tools=desc)
    ref = _text(obj, "reference")
    msgs = rounds_to_messages(_rounds(obj, False))
    msgs[0] = ("user", f"{REFERENCE_HEAD}{ref}\n\n{msgs[0][1]}")
    return kind, Dialog(msgs)


def parts_for(template: Template, kind: str, payload) -> list:
    if kind == "pretrain":
        return template.pretrain_parts(payload)
    if kind == "instruct":
        return template.instruct_parts(*payload)
    return template.dialog_parts(payload)
