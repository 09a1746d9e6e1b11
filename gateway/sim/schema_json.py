"""A value that validates against a JSON Schema, derived from a seed: the simulator's structured output.

Covers what OpenAI's structured outputs and tool parameters use: ``type`` (one or several, ``null`` included),
``properties`` / ``required`` / ``additionalProperties``, ``items`` / ``prefixItems`` / ``minItems`` /
``maxItems``, ``enum``, ``const``, ``anyOf`` / ``oneOf`` / ``allOf``, ``$ref`` into ``$defs`` or ``definitions``,
string ``format`` (date-time, date, time, email, uri, uuid), ``minLength`` / ``maxLength``, numeric bounds and
``multipleOf``, and ``default``. A ``pattern`` is not reproduced (a plain word is written instead).
"""

from __future__ import annotations

import random
from typing import Any

_WORDS = ("alpha", "bravo", "delta", "gateway", "tenant", "route", "model", "answer", "cache", "stream", "token",
          "budget", "node", "limit", "signal", "report")
MAX_DEPTH = 12


def instance(schema: Any, seed: int) -> Any:
    """A value ``schema`` accepts, the same for the same seed."""
    return _Maker(schema if isinstance(schema, dict) else {}, random.Random(seed)).make(schema, 0)


class _Maker:
    def __init__(self, root: dict, rng: random.Random) -> None:
        self.root = root
        self.rng = rng

    def make(self, schema: Any, depth: int) -> Any:
        if not isinstance(schema, dict) or depth > MAX_DEPTH:
            return None if depth > MAX_DEPTH else self._word()
        if "$ref" in schema:
            return self.make(self._resolve(schema["$ref"]), depth + 1)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][self.rng.randrange(len(schema["enum"]))]
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                concrete = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
                return self.make(concrete[0] if concrete else options[0], depth + 1)
        if isinstance(schema.get("allOf"), list):
            merged: dict = {}
            for part in schema["allOf"]:
                part = self._resolve(part["$ref"]) if isinstance(part, dict) and "$ref" in part else part
                if isinstance(part, dict):
                    merged = _merge(merged, part)
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            return self.make(_merge(merged, rest), depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            concrete = [k for k in kind if k != "null"]
            kind = concrete[0] if concrete else "null"
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
        maker = getattr(self, f"_{kind}", None)
        return maker(schema, depth) if maker is not None else self._word()

    def _resolve(self, reference: str) -> dict:
        if not isinstance(reference, str) or not reference.startswith("#"):
            return {}
        node: Any = self.root
        for part in reference.lstrip("#/").split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}

    def _object(self, schema: dict, depth: int) -> dict:
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        result = {name: self.make(sub, depth + 1) for name, sub in properties.items()}
        for name in schema.get("required") or ():
            if isinstance(name, str) and name not in result:
                extra = schema.get("additionalProperties")
                result[name] = self.make(extra if isinstance(extra, dict) else {}, depth + 1)
        if not result and isinstance(schema.get("additionalProperties"), dict):
            result[self._word()] = self.make(schema["additionalProperties"], depth + 1)
        return result

    def _array(self, schema: dict, depth: int) -> list:
        prefix = schema.get("prefixItems") if isinstance(schema.get("prefixItems"), list) else []
        low = int(schema.get("minItems") or 0)
        high = schema.get("maxItems")
        count = max(low, len(prefix), min(2, high) if isinstance(high, int) else 2)
        if isinstance(high, int):
            count = min(count, high)
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return [self.make(prefix[i] if i < len(prefix) else items, depth + 1) for i in range(count)]

    def _string(self, schema: dict, depth: int) -> str:
        text = {
            "date-time": "2026-01-31T12:00:00Z", "date": "2026-01-31", "time": "12:00:00",
            "email": f"{self._word()}@example.com", "uri": f"https://example.com/{self._word()}",
            "uuid": "123e4567-e89b-42d3-a456-%012x" % self.rng.getrandbits(48),
        }.get(schema.get("format"), None)
        if text is None:
            text = self._word() if "default" not in schema or not isinstance(schema["default"], str) \
                else schema["default"]
        low, high = schema.get("minLength"), schema.get("maxLength")
        if isinstance(low, int) and len(text) < low:
            text += "x" * (low - len(text))
        if isinstance(high, int) and len(text) > high:
            text = text[:high]
        return text

    def _number(self, schema: dict, depth: int, whole: bool = False) -> float | int:
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        low = low if isinstance(low, (int, float)) else (0 if not isinstance(high, (int, float)) else high - 100)
        high = high if isinstance(high, (int, float)) else low + 100
        value = low + (high - low) * (0.25 + self.rng.random() / 2)
        step = schema.get("multipleOf")
        if isinstance(step, (int, float)) and step > 0:
            value = round(value / step) * step
        if whole:
            value = int(round(value))
            value = min(max(value, int(-(-low // 1))), int(high // 1)) if low <= high else value
        return value if whole else round(value, 3)

    def _integer(self, schema: dict, depth: int) -> int:
        return self._number(schema, depth, whole=True)

    def _boolean(self, schema: dict, depth: int) -> bool:
        return self.rng.random() < 0.5

    def _null(self, schema: dict, depth: int) -> None:
        return None

    def _word(self) -> str:
        return self.rng.choice(_WORDS)


def _merge(first: dict, second: dict) -> dict:
    merged = {**first, **second}
    if isinstance(first.get("properties"), dict) and isinstance(second.get("properties"), dict):
        merged["properties"] = {**first["properties"], **second["properties"]}
    if first.get("required") or second.get("required"):
        merged["required"] = list(dict.fromkeys([*(first.get("required") or ()), *(second.get("required") or ())]))
    return merged


def pieces(text: str, seed: int) -> list[str]:
    """``text`` cut into stream-sized pieces (3 to 8 characters), as a model's tokens arrive."""
    rng = random.Random(seed)
    result, position = [], 0
    while position < len(text):
        size = 3 + rng.randrange(6)
        result.append(text[position:position + size])
        position += size
    return result or [""]
