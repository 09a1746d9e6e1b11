"""MkDocs hooks: the reference pages written from the code itself, so that they cannot drift from it.

``<!-- config-reference -->`` becomes every field of models.yaml and tenants.yaml (from the schema the gateway
validates them with); ``<!-- api-reference -->`` every route of the admin and operations API (from the OpenAPI
document the gateway serves at /openapi.json).
"""

from __future__ import annotations

import json
import re

CONFIG_MARK = "<!-- config-reference -->"
API_MARK = "<!-- api-reference -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if CONFIG_MARK in markdown:
        markdown = markdown.replace(CONFIG_MARK, config_reference())
    if API_MARK in markdown:
        markdown = markdown.replace(API_MARK, api_reference())
    return markdown


# -- The config files ------------------------------------------------------------------------------------------------

def config_reference() -> str:
    from gateway.config.schema import ModelsFile, TenantsFile

    out = []
    for title, model in (("models.yaml", ModelsFile), ("tenants.yaml", TenantsFile)):
        schema = model.model_json_schema(mode="validation")
        definitions = schema.get("$defs", {})
        prefix = title.split(".")[0]
        out.append(f"## {title}\n")
        out.append(_object_table(schema, definitions, prefix))
        for name in sorted(definitions):
            out.append(f"### {prefix}: {name} {{ #{_anchor(prefix, name)} }}\n")
            definition = definitions[name]
            if definition.get("description"):
                out.append(_text(definition["description"]) + "\n")
            if definition.get("properties"):
                out.append(_object_table(definition, definitions, prefix))
            else:
                out.append(f"A value of type {_type(definition, prefix)}.\n")
    return "\n".join(out)


def _anchor(prefix: str, name: str) -> str:
    return f"{prefix}-{name}".lower()


def _object_table(schema: dict, definitions: dict, prefix: str) -> str:
    required = set(schema.get("required", ()))
    rows = ["| Field | Type | Default | What it is |", "|---|---|---|---|"]
    for field, spec in schema.get("properties", {}).items():
        default = "required" if field in required else _default(spec)
        rows.append(f"| `{field}` | {_type(spec, prefix)} | {default} | {_text(spec.get('description', ''))} |")
    return "\n".join(rows) + "\n"


def _default(spec: dict) -> str:
    if "default" not in spec:
        return ""
    value = spec["default"]
    if isinstance(value, (dict, list)) and value:
        return "see its fields"
    return f"`{json.dumps(value)}`"


def _type(spec: dict, prefix: str) -> str:
    if "$ref" in spec:
        name = spec["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{_anchor(prefix, name)})"
    for key in ("anyOf", "oneOf", "allOf"):
        if key in spec:
            return " or ".join(_type(option, prefix) for option in spec[key] if option.get("type") != "null") + (
                " or null" if any(option.get("type") == "null" for option in spec[key]) else "")
    if "enum" in spec:
        return "one of " + ", ".join(f"`{value}`" for value in spec["enum"])
    if "const" in spec:
        return f"`{spec['const']}`"
    kind = spec.get("type", "any")
    if kind == "array":
        return f"list of {_type(spec.get('items', {}), prefix)}"
    if kind == "object":
        values = spec.get("additionalProperties")
        if isinstance(values, dict):
            keys = spec.get("propertyNames", {}).get("pattern")
            return f"map of {'`' + keys + '` ' if keys else ''}names to {_type(values, prefix)}"
        return "object"
    bounds = [f"{word} {spec[key]}" for key, word in (("minimum", "≥"), ("maximum", "≤"), ("exclusiveMinimum", ">"),
                                                         ("minLength", "length ≥"), ("maxLength", "length ≤"))
              if key in spec]
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def _text(text: str) -> str:
    return re.sub(r"\s+", " ", text).replace("|", "\\|").strip()


# -- The admin and operations API ------------------------------------------------------------------------------------

def api_reference() -> str:
    from fastapi.openapi.utils import get_openapi

    from gateway.api.ops import _without_422
    from gateway.app import Gateway
    from gateway.settings import Settings

    gateway = Gateway(Settings())
    document = get_openapi(title="LLM gateway", version="", routes=gateway.ops.routes)
    _without_422(document)  # as the gateway serves it: a bad body is OpenAI's 400
    out = []
    by_tag: dict[str, list[tuple[str, str, dict]]] = {}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            tag = (operation.get("tags") or ["other"])[0]
            by_tag.setdefault(tag, []).append((method.upper(), path, operation))
    for tag in sorted(by_tag):
        out.append(f"## {tag}\n")
        for method, path, operation in by_tag[tag]:
            out.append(f"### `{method} {path}`\n")
            summary = operation.get("summary") or ""
            description = operation.get("description") or ""
            if description:
                out.append(_paragraphs(description) + "\n")
            elif summary:
                out.append(summary + "\n")
            parameters = operation.get("parameters") or []
            if parameters:
                out.append("| Parameter | In | Type | Required | What it is |\n|---|---|---|---|---|")
                for parameter in parameters:
                    out.append(f"| `{parameter['name']}` | {parameter['in']} | "
                               f"{_type(parameter.get('schema', {}), 'api')} | "
                               f"{'yes' if parameter.get('required') else 'no'} | "
                               f"{_text(parameter.get('description', ''))} |")
                out.append("")
            body = operation.get("requestBody", {}).get("content", {})
            for media, content in body.items():
                reference = content.get("schema", {}).get("$ref", "")
                out.append(f"Body ({media}): `{reference.rsplit('/', 1)[-1] or 'see the OpenAPI document'}`.\n")
            statuses = ", ".join(f"{status} {_text(answer.get('description', ''))}"
                                 for status, answer in operation.get("responses", {}).items())
            out.append(f"Answers: {statuses}.\n")
    return "\n".join(out)


def _paragraphs(text: str) -> str:
    return "\n\n".join(re.sub(r"\s+", " ", part).strip() for part in text.split("\n\n"))
