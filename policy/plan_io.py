"""Plan <-> canonical JSON: encoding, version policy, JSON Schema validation, decoding.

Canonical form: sorted keys, 2-space indent, floats rounded to FLOAT_DIGITS significant digits,
no NaN/inf, final newline; so the same plan always gives the same bytes. Decoding runs the
version policy (newer major refused, a newer minor's unknown fields dropped, a 2.x plan migrated:
its background cache groups become reuse-only runs), then the committed JSON Schema, then the
dataclasses' semantic checks; every failure is a PlanError naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import typing
from pathlib import Path

from ditplan.policy.atomic import atomic_write_text
from ditplan.policy.plan import PLAN_SCHEMA_VERSION, RECOMPILE, Plan, PlanError
from ditplan.policy.plan_schema import EXPERT_PLANS, SCHEMA_PATH, split_optional

logger = logging.getLogger(__name__)

FLOAT_DIGITS = 6
_VERSION = re.compile(r"([0-9]+)\.([0-9]+)")
_UPGRADE = "upgrade ditplan (pip install -U ditplan)"
MIGRATES_FROM = 2  # plans of this major are converted on load
EXPERT_FILE_FIELDS = ("boundary_ratio", "experts", "schema_version")  # of an expert plan file


def _encode(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PlanError(f"plan holds a non-finite number ({value}); {RECOMPILE}")
        return float(f"{value:.{FLOAT_DIGITS}g}")
    return value


def plan_to_dict(plan: Plan) -> dict:
    """Returns the plan as plain JSON values (lists for tuples, rounded floats)."""
    return _encode(plan)


def plan_to_json(plan: Plan) -> str:
    """Returns the canonical JSON text of ``plan`` (byte-stable for equal plans).

    The plan is first normalized (schema-checked, values coerced to their declared types), so
    an int given for a float field and the float itself give the same bytes.
    """
    data = plan_to_dict(normalize_plan(plan))
    return json.dumps(data, sort_keys=True, indent=2, allow_nan=False) + "\n"


def normalize_plan(plan: Plan) -> Plan:
    """Returns the plan exactly as saving and loading it would give (rounded, schema-checked)."""
    return plan_from_dict(plan_to_dict(plan))


def save_plan(plan: Plan, path: str | os.PathLike) -> Path:
    """Write ``plan`` as canonical JSON to ``path`` atomically; creates the parent folder.

    Returns:
        the written path.
    """
    return write_plan_text(path, plan_to_json(plan))


def write_plan_text(path: str | os.PathLike, text: str) -> Path:
    """Write a plan file's JSON text atomically, creating the parent folder; the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, text)


def load_plan(path: str | os.PathLike) -> Plan:
    """Read, version-check, schema-check and build a plan; PlanError on any problem.

    Args:
        path: a plan JSON file written by ``save_plan`` (or by hand).
    Returns:
        the validated Plan.
    """
    path = Path(path)
    text = read_plan_text(path)
    try:
        return plan_from_json_text(text)
    except PlanError as exc:
        raise PlanError(f"{path}: {exc}") from exc


def read_plan_text(path: Path) -> str:
    """A plan file's text; PlanError when it is missing or unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        msg = f"plan file {path} does not exist; create it with `ditplan compile-policy`"
        raise PlanError(msg) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"cannot read plan file {path} ({exc})") from exc


def parse_plan_json(text: str) -> object:
    """Decode a plan file's JSON text strictly (no NaN/Infinity); PlanError otherwise."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        raise PlanError(f"not valid JSON ({str(exc)[:200]}); {RECOMPILE}") from exc


def plan_from_json_text(text: str) -> Plan:
    """Parse plan JSON text (strict: no NaN/Infinity) and build the Plan."""
    return plan_from_dict(parse_plan_json(text))


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in a plan")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def plan_from_dict(data) -> Plan:
    """Build a Plan from decoded JSON: version policy, JSON Schema, then semantic checks."""
    if isinstance(data, dict) and "experts" in data:
        raise PlanError("this is a Wan2.2 plan file with a section per expert; read it with "
                        "ditplan.policy.experts.load_any_plan and apply it with "
                        "ditplan.runtime.experts.apply_expert_plans")
    try:
        if _major(data) == MIGRATES_FROM:
            data = migrate_v2(data)
        minor_is_newer = _check_version(data)
        if minor_is_newer:
            data = _strip_unknown(data, Plan)
        _validate_schema(data)
        return _build(Plan, data, "")
    except RecursionError as exc:
        raise PlanError("plan is nested too deeply to be a ditplan plan") from exc


def checked_expert_file(data) -> dict:
    """An expert plan file's decoded JSON after the version policy (a newer minor's unknown
    fields dropped, at the top and in each section) and the JSON Schema's ``ExpertPlans``;
    each section is then built with :func:`plan_from_dict`."""
    try:
        if _check_version(data):
            data = {k: v for k, v in data.items() if k in EXPERT_FILE_FIELDS}
            sections = data.get("experts")
            if isinstance(sections, dict):
                data["experts"] = {n: _strip_unknown(p, Plan) for n, p in sections.items()}
        _validate_schema(data, EXPERT_PLANS)
        return data
    except RecursionError as exc:
        raise PlanError("plan is nested too deeply to be a ditplan plan") from exc


def _major(data) -> int | None:
    text = data.get("schema_version") if isinstance(data, dict) else None
    match = _VERSION.fullmatch(text) if isinstance(text, str) else None
    return int(match[1]) if match else None


def migrate_v2(data: dict) -> dict:
    """A 2.x plan as 3.0: each background cache group becomes a run that reuses where the group
    did not compute (the same execution); everything else is unchanged."""
    data = dict(data)
    groups = data.pop("cache_groups", [])
    if not isinstance(groups, list):
        raise PlanError(f"cache_groups: expected a list in a 2.x plan; {RECOMPILE}")
    runs = []
    for i, group in enumerate(groups):
        try:
            schedule = {c: "".join("C" if m else "R" for m in mask)
                        for c, mask in group["compute"].items()}
            runs.append({"blocks": group["blocks"], "schedule": schedule})
        except (TypeError, KeyError, AttributeError) as exc:
            raise PlanError(f"cache_groups[{i}]: malformed 2.x cache group ({exc}); "
                            f"{RECOMPILE}") from None
    data["runs"] = runs
    data["schema_version"] = PLAN_SCHEMA_VERSION
    logger.info("plan schema 2.x migrated to %s (cache groups -> reuse runs)", PLAN_SCHEMA_VERSION)
    return data


def _check_version(data) -> bool:
    if not isinstance(data, dict):
        raise PlanError(f"a plan is a JSON object, got {type(data).__name__}; {RECOMPILE}")
    text = data.get("schema_version")
    match = _VERSION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise PlanError(
            f"schema_version: missing or not 'major.minor' ({str(text)[:40]!r}); this is not a "
            f"ditplan plan or it is damaged; {RECOMPILE}"
        )
    major, minor = int(match[1]), int(match[2])
    ours = _VERSION.fullmatch(PLAN_SCHEMA_VERSION)
    if major > int(ours[1]):
        raise PlanError(
            f"schema_version: {text} was written by a newer ditplan (this one reads "
            f"{ours[1]}.x); {_UPGRADE}"
        )
    if major < int(ours[1]):
        raise PlanError(f"schema_version: {text} is an old plan format; {RECOMPILE}")
    return minor > int(ours[2])


def _strip_unknown(value, tp):
    _, tp = split_optional(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        dropped = sorted(set(value) - set(hints))
        if dropped:
            logger.debug("newer-minor plan: ignoring unknown %s fields %s", tp.__name__, dropped)
        return {k: _strip_unknown(v, hints[k]) for k, v in value.items() if k in hints}
    if origin is dict and args and isinstance(value, dict):
        return {k: _strip_unknown(v, args[1]) for k, v in value.items()}
    if origin is tuple and isinstance(value, list) and args and args[-1] is Ellipsis:
        return [_strip_unknown(v, args[0]) for v in value]
    return value


@functools.lru_cache(maxsize=2)
def _validator(definition: str | None = None):
    """The plan schema's validator: of a plan (the root), or of one of its ``$defs``."""
    import jsonschema

    try:
        schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PlanError(f"the installed plan schema {SCHEMA_PATH} is unreadable ({exc})") from exc
    validator = jsonschema.Draft202012Validator(schema)
    if definition is None:
        return validator
    return validator.evolve(schema={"$ref": f"#/$defs/{definition}"})  # "#" is still a plan


def _validate_schema(data: dict, definition: str | None = None) -> None:
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator(definition).iter_errors(data))
    if error is None:
        return
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    raise PlanError(
        f"{where.lstrip('.') or 'plan'}: {error.message[:300]}; fix this field or {RECOMPILE}"
    )


def _build(tp, value, path: str):
    optional, tp = split_optional(tp)
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path)
    if origin is dict and args and args[1] is not object:
        return {k: _build(args[1], v, f"{path}.{k}".lstrip(".")) for k, v in value.items()}
    if origin is tuple:
        item = (lambda i: args[0]) if args[-1] is Ellipsis else (lambda i: args[i])
        return tuple(_build(item(i), v, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float:
        try:
            return float(value)
        except OverflowError:
            raise PlanError(f"{path}: {str(value)[:20]}... is too large for a number") from None
    return int(value) if tp is int else value


def _build_dataclass(cls, value: dict, path: str):
    hints = typing.get_type_hints(cls)
    kwargs = {
        f.name: _build(hints[f.name], value[f.name], f"{path}.{f.name}".lstrip("."))
        for f in dataclasses.fields(cls)
        if f.name in value
    }
    try:
        return cls(**kwargs)
    except PlanError as exc:
        raise PlanError(f"{path}: {exc}" if path else str(exc)) from exc
