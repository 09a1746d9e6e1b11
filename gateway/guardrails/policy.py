"""A tenant's (and a key's) guardrails compiled once per config, and what they make of a request and of an answer.

A rule is a check (a detector of the text, the request's tools, its size or its topics), the direction it reads
(the request, the answer, or both) and an action: ``block`` refuses the request (or ends the answer), ``redact``
masks what was found (a refused tool is dropped from the request), ``flag`` lets it through. Every rule that
fires is recorded (its name, check, direction and action, never the text it matched).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Callable, Iterator

from gateway.guardrails.detect import (DETECTORS, PLACEHOLDERS, Detector, phone_detector, regex_detector,
                                      words_detector)

TEXT_CHECKS = frozenset(DETECTORS) | {"deny_list", "regex"}


@dataclass(frozen=True, slots=True)
class Guardrail:
    name: str
    check: str
    reads_input: bool
    reads_output: bool
    action: str  # block, redact or flag
    message: str | None = None
    detect: Detector | None = None  # the text checks (and refused topics: one detector a topic, in ``topics``)
    placeholder: str = "[REDACTED]"
    topics: tuple[tuple[str, Detector], ...] = ()
    allowed: Detector | None = None  # allowed topics: a request must touch one of them
    max_tokens: int | None = None
    allowed_tools: tuple[str, ...] | None = None
    refused_tools: tuple[str, ...] = ()
    # A model check: the guard model, its kind ("moderation" or "chat"), what each flagged category does, how long
    # it may take, and whether its failure refuses the request (closed) or lets it through (open)
    guard_model: str | None = None
    guard_kind: str = "moderation"
    categories: tuple[tuple[str, str], ...] = ()
    timeout: float = 2.0
    fail_closed: bool = False
    spec: dict = field(default_factory=dict, compare=False)  # as configured (the admin API shows it)

    def refusal(self, what: str) -> str:
        """What a refused client is told: the rule, never the text."""
        return self.message or f"This request was refused by the guardrail '{self.name}' ({what})."


def compile_rules(specs: list, models: dict | None = None, problems: list[str] | None = None,
                  where: str = "") -> tuple[Guardrail, ...]:
    """GuardrailSpec objects (already validated) as rules ready to run; a guard model ``models`` lacks is a problem
    said with ``where``."""
    rules = []
    for spec in specs:
        common = dict(name=spec.name, check=spec.check, reads_input=spec.direction in ("input", "both"),
                      reads_output=spec.direction in ("output", "both"), action=spec.action, message=spec.message,
                      spec=spec.model_dump(exclude_none=True))
        if spec.check == "phone" and tuple(spec.regions) != ("US",):
            rules.append(Guardrail(**common, detect=phone_detector(tuple(spec.regions)), placeholder="[PHONE]"))
        elif spec.check in DETECTORS:
            rules.append(Guardrail(**common, detect=DETECTORS[spec.check], placeholder=PLACEHOLDERS[spec.check]))
        elif spec.check == "deny_list":
            rules.append(Guardrail(**common, detect=words_detector(spec.words)))
        elif spec.check == "regex":
            rules.append(Guardrail(**common, detect=regex_detector(spec.pattern)))
        elif spec.check == "topics":
            rules.append(Guardrail(**common, topics=tuple((topic, words_detector(words)) for topic, words in
                                                          spec.refused_topics.items()),
                                   allowed=words_detector([w for words in spec.allowed_topics.values()
                                                           for w in words]) if spec.allowed_topics else None))
        elif spec.check == "max_prompt_tokens":
            rules.append(Guardrail(**common, max_tokens=spec.max_tokens))
        elif spec.check == "tools":
            allowed = tuple(spec.allowed_tools) if spec.allowed_tools is not None else None
            rules.append(Guardrail(**common, allowed_tools=allowed, refused_tools=tuple(spec.refused_tools)))
        elif spec.check == "model":
            model = (models or {}).get(spec.model)
            if model is None or model.type not in ("moderation", "chat"):
                if problems is not None:
                    problems.append(f"{where}: guardrail '{spec.name}': the guard model '{spec.model}' is not a "
                                    "moderation or chat model of models.yaml")
                continue
            rules.append(Guardrail(**common, guard_model=spec.model, guard_kind=model.type,
                                   categories=tuple(spec.categories.items()), timeout=float(spec.timeout_seconds),
                                   fail_closed=spec.on_failure == "closed"))
    return tuple(rules)


@dataclass
class Verdict:
    """What a policy made of one request and its answer."""

    fired: list[dict] = field(default_factory=list)  # {"rule", "check", "direction", "action"}
    refused: Guardrail | None = None
    reason: str | None = None  # the refusal's words (the ledger's refusal_reason)
    translate: bool = False  # the request must not go to an upstream as it came (it was masked, or answers are read)
    streamed: list[str] = field(default_factory=list)  # a stream's text as it came (billed if the stream is cut)

    def add(self, rule: Guardrail, direction: str, action: str | None = None) -> None:
        entry = {"rule": rule.name, "check": rule.check, "direction": direction, "action": action or rule.action}
        if entry not in self.fired:
            self.fired.append(entry)


# -- Texts of a request and of an answer ------------------------------------------------------------------------

def request_texts(body: dict) -> Iterator[tuple[Any, Any]]:
    """(container, key) of every text of a request the upstream reads: messages (string or text parts), the
    arguments of earlier tool calls, a completion's prompt, an embedding's input."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, str):
                yield message, "content"
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        yield part, "text"
            for call in message.get("tool_calls") or ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    yield function, "arguments"
    for name in ("prompt", "input"):
        value = body.get(name)
        if isinstance(value, str):
            yield body, name
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, str):
                    yield value, index


def _user_text(body: dict) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list):
        value = body.get("prompt", body.get("input"))
        return value if isinstance(value, str) else " ".join(v for v in value or () if isinstance(v, str))
    texts = []
    for message in messages:
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return "\n".join(texts)


def mask(text: str, spans: list[tuple[int, int]], placeholder: str) -> str:
    """``text`` with every span replaced by ``placeholder`` (overlapping spans merged)."""
    out, position = [], 0
    for start, end in sorted(spans):
        if end <= position:
            continue
        start = max(start, position)
        out.append(text[position:start])
        out.append(placeholder)
        position = end
    out.append(text[position:])
    return "".join(out)


# -- The request ---------------------------------------------------------------------------------------------------

def inspect_request(rules: tuple[Guardrail, ...], body: dict, verdict: Verdict,
                    count_tokens: Callable[[], int]) -> None:
    """Run the input rules in order on ``body``, masking it in place; ``verdict.refused`` set by the first block."""
    for rule in rules:
        if not rule.reads_input or rule.guard_model is not None:  # a guard model is asked afterwards (guard.py)
            continue
        if rule.detect is not None:
            found = _run_on_request(rule, body)
            what = f"{rule.check.replace('_', ' ')} in the request"
        elif rule.topics or rule.allowed is not None:
            found, what = _topics(rule, body)
        elif rule.max_tokens is not None:  # a token is a character at least: a shorter text needs no count
            found = _characters(body) > rule.max_tokens and count_tokens() > rule.max_tokens
            what = f"a prompt of more than {rule.max_tokens} tokens"
        else:
            found, what = _tools(rule, body)
        if not found:
            continue
        verdict.add(rule, "input")
        if rule.action == "block":
            verdict.refused, verdict.reason = rule, rule.refusal(what)
            return


def _characters(body: dict) -> int:
    return sum(len(container[key]) for container, key in request_texts(body)) + len(str(body.get("tools") or ""))


def _run_on_request(rule: Guardrail, body: dict) -> bool:
    found = False
    for container, key in list(request_texts(body)):
        text = container[key]
        spans = rule.detect(text)
        if not spans:
            continue
        found = True
        if rule.action == "block":
            return True
        if rule.action == "redact":
            container[key] = mask(text, spans, rule.placeholder)
    return found


def _topics(rule: Guardrail, body: dict) -> tuple[bool, str]:
    text = _user_text(body)
    for topic, detect in rule.topics:
        spans = detect(text)
        if spans:
            if rule.action == "redact":
                for container, key in list(request_texts(body)):
                    container[key] = mask(container[key], detect(container[key]), "[REDACTED]")
            return True, f"the topic '{topic}'"
    if rule.allowed is not None and not rule.allowed(text):
        return True, "a topic outside those this service answers"
    return False, ""


def _tools(rule: Guardrail, body: dict) -> tuple[bool, str]:
    tools = body.get("tools")
    if not isinstance(tools, list):
        return False, ""
    refused = [name for name in _tool_names(tools) if not _tool_allowed(rule, name)]
    if not refused:
        return False, ""
    if rule.action == "redact":
        body["tools"] = [t for t in tools if _tool_name(t) not in refused]
        if not body["tools"]:
            del body["tools"]
            body.pop("tool_choice", None)
        choice = body.get("tool_choice")
        if isinstance(choice, dict) and (choice.get("function") or {}).get("name") in refused:
            body.pop("tool_choice")
    return True, f"the tool '{refused[0][:64]}'"


def _tool_name(tool: Any) -> str | None:
    function = tool.get("function") if isinstance(tool, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None


def _tool_names(tools: list) -> list[str]:
    return [name for name in map(_tool_name, tools) if name is not None]


def _tool_allowed(rule: Guardrail, name: str) -> bool:
    if any(fnmatchcase(name, pattern) for pattern in rule.refused_tools):
        return False
    return rule.allowed_tools is None or any(fnmatchcase(name, pattern) for pattern in rule.allowed_tools)


# -- The answer ----------------------------------------------------------------------------------------------------

def inspect_text(rules: tuple[Guardrail, ...], text: str, verdict: Verdict) -> tuple[str, Guardrail | None]:
    """An answer's text through the output rules: masked where a rule redacts; the first rule that blocks."""
    for rule in rules:
        spans = rule.detect(text)
        if not spans:
            continue
        verdict.add(rule, "output")
        if rule.action == "block":
            return text, rule
        if rule.action == "redact":
            text = mask(text, spans, rule.placeholder)
    return text, None


def output_rules(rules: tuple[Guardrail, ...]) -> tuple[Guardrail, ...]:
    return tuple(rule for rule in rules if rule.reads_output and rule.detect is not None)


def output_judges(rules: tuple[Guardrail, ...]) -> tuple[Guardrail, ...]:
    """The guard models that read answers."""
    return tuple(rule for rule in rules if rule.reads_output and rule.guard_model is not None)
