"""Generate the plan's JSON Schema from the plan dataclasses (the committed plan.schema.json).

Regenerate after changing a plan dataclass: ``python -m ditplan.policy.plan_schema --write``
(and bump PLAN_SCHEMA_VERSION: minor for a new optional field, major otherwise). A test checks
that the committed file equals what this module generates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path

from ditplan.policy import plan as plan_module
from ditplan.policy.atomic import atomic_write_text

SCHEMA_PATH = Path(__file__).with_name("plan.schema.json")
EXPERT_PLANS = "ExpertPlans"  # the $defs entry of an expert plan file
_PRIMITIVES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def split_optional(tp) -> tuple[bool, object]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return True, rest[0]
    return False, tp


def type_schema(tp) -> dict:
    """JSON Schema for one Python type annotation used by the plan dataclasses."""
    optional, tp = split_optional(tp)
    if optional:
        inner = type_schema(tp)
        if set(inner) == {"type"}:
            return {"type": [inner["type"], "null"]}
        return {"anyOf": [inner, {"type": "null"}]}
    if tp in _PRIMITIVES:
        return {"type": _PRIMITIVES[tp]}
    if dataclasses.is_dataclass(tp):
        return {"$ref": f"#/$defs/{tp.__name__}"}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is dict or (origin is dict and args[1] is object):
        return {"type": "object"}
    if origin is dict:
        return {"type": "object", "additionalProperties": type_schema(args[1])}
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"type": "array", "items": type_schema(args[0])}
    if origin is tuple and len(set(args)) == 1:
        n = len(args)
        return {"type": "array", "items": type_schema(args[0]), "minItems": n, "maxItems": n}
    raise TypeError(f"no JSON Schema mapping for {tp!r}")


def _merge(schema: dict, extra: dict) -> dict:
    out = dict(schema)
    for key, value in extra.items():
        if key == "items" and "items" in out:
            out["items"] = {**out["items"], **value}
        elif "anyOf" in out:
            out["anyOf"] = [_merge(out["anyOf"][0], {key: value}), out["anyOf"][1]]
        else:
            out[key] = value
    return out


def dataclass_schema(cls) -> dict:
    """JSON Schema object for dataclass ``cls``: every field a property, no extras allowed."""
    hints = typing.get_type_hints(cls)
    props, required = {}, []
    for f in dataclasses.fields(cls):
        props[f.name] = _merge(type_schema(hints[f.name]), f.metadata.get("schema", {}))
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    return {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }


def plan_dataclasses() -> list[type]:
    """Every dataclass reachable from Plan, in a stable order."""
    found: dict[str, type] = {}

    def visit(tp):
        for arg in typing.get_args(tp):
            visit(arg)
        if dataclasses.is_dataclass(tp) and tp.__name__ not in found:
            found[tp.__name__] = tp
            for hint in typing.get_type_hints(tp).values():
                visit(hint)

    visit(plan_module.Plan)
    return [found[name] for name in sorted(found)]


def expert_plans_schema() -> dict:
    """JSON Schema of a Wan2.2 expert plan file (policy.experts): a complete plan, the schema's
    root, per expert, and the boundary where the pipeline switches them."""
    sections = {name: {"$ref": "#"} for name in plan_module.EXPERTS}
    return {
        "type": "object",
        "properties": {
            "boundary_ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "experts": {"type": "object", "properties": sections,
                        "required": list(plan_module.EXPERTS), "additionalProperties": False},
            "schema_version": {"type": "string", "pattern": r"^[0-9]+\.[0-9]+$"},
        },
        "required": ["boundary_ratio", "experts", "schema_version"],
        "additionalProperties": False,
    }


def plan_json_schema() -> dict:
    """Returns the full plan JSON Schema (draft 2020-12), rooted at Plan; ``$defs.ExpertPlans``
    describes an expert plan file."""
    defs = {cls.__name__: dataclass_schema(cls) for cls in plan_dataclasses()}
    root = defs.pop("Plan")
    defs[EXPERT_PLANS] = expert_plans_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"ditplan plan (schema {plan_module.PLAN_SCHEMA_VERSION})",
        **root,
        "$defs": defs,
    }


def render_schema() -> str:
    """The schema as the committed file holds it (sorted keys, 2-space indent, final newline)."""
    return json.dumps(plan_json_schema(), sort_keys=True, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {SCHEMA_PATH.name}")
    args = parser.parse_args(argv)
    if args.write:
        atomic_write_text(SCHEMA_PATH, render_schema())
        return 0
    if SCHEMA_PATH.read_text() == render_schema():
        return 0
    sys.stderr.write(f"{SCHEMA_PATH} is stale; rerun with --write and bump PLAN_SCHEMA_VERSION\n")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
