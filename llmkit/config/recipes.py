"""Reading a recipe: YAML and JSON files (strict: duplicate keys, alias bombs), `--set` overrides and typed
flags resolved into a RunConfig, errors that name the dotted key; the paths a recipe makes a command read; the
resolved recipe written back (secrets redacted) and the key reference."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from llmkit.config.schema import RunConfig, Section
from llmkit.errors import UserError, closest


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (YAML itself lets the last one win silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key '{key}' (first at line {seen[key]}); keep one of them",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def yaml_path(path: str | Path) -> Path:
    """A recipe or task file: the path given, or else the bundled file of that name (`tiny-cpu`, `ci-eval`)."""
    path = Path(path)
    if path.is_file():
        return path
    from llmkit.bundled import bundled_files

    bundled = bundled_files().get(str(path.with_suffix("") if path.suffix == ".yaml" else path))
    if bundled is None or bundled.suffix != ".yaml":
        raise UserError(f"{path}: config file not found (`llmkit recipes` lists the bundled ones)")
    return bundled


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a one-line error for a missing file, bad syntax, a key given twice or bytes
    that are not UTF-8."""
    path = yaml_path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: byte 0x{data[exc.start : exc.start + 1].hex()} at offset {exc.start} is not UTF-8; "
            "a recipe is UTF-8 text (save it as UTF-8)"
        ) from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"{path}{where}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a config file must be a mapping of sections, got {type(raw).__name__}")
    if _values_beyond(raw, MAX_RECIPE_VALUES):
        raise UserError(
            f"{path}: its YAML aliases expand to more than {MAX_RECIPE_VALUES:,} values; a recipe is a few hundred "
            "(write the values out, or use fewer nested aliases)"
        )
    return raw


MAX_RECIPE_VALUES = 100_000  # a recipe holds hundreds; aliases of aliases can make a few bytes billions


def _values_beyond(node: Any, limit: int) -> bool:
    """Whether `node`, with every alias expanded, holds more than `limit` values (stops counting there)."""
    count, stack = 0, [node]
    while stack:
        item = stack.pop()
        count += 1
        if count > limit:
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def read_json_mapping(path: str | Path, missing: str) -> dict[str, Any]:
    """Read a JSON object, with a one-line error for a missing file (`missing` says what it should be) or bad JSON."""
    import json

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {missing}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {assignment!r}: expected dotted.key=value, e.g. --set train.max_steps=100")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _tensorboard_to_report_to(section: dict[str, Any], value: Any) -> str:
    trackers = [t for t in section.get("report_to", ["tensorboard"]) if t != "tensorboard"]
    section["report_to"] = ["tensorboard", *trackers] if value else trackers
    return f"logging.report_to: {section['report_to']}"


def _num_proc_to_workers(section: dict[str, Any], value: Any) -> str:
    if "workers" in section:
        return f"data.workers: {section['workers']} (given too, so it wins)"
    section["workers"] = value
    return f"data.workers: {value}"


# Keys old recipes still use: (section, old key) -> how to read it into today's keys, returning what it became.
RENAMED: dict[tuple[str, str], Any] = {
    ("logging", "tensorboard"): _tensorboard_to_report_to,
    ("data", "num_proc"): _num_proc_to_workers,  # one knob for the processes of curation and of tokenization
}


def _read_renamed(raw: dict[str, Any], source: str) -> None:
    """Rewrite renamed keys in place, with one deprecation line each on stderr (an old recipe keeps working)."""
    import sys

    for (section, key), convert in RENAMED.items():
        values = raw.get(section)
        if isinstance(values, dict) and key in values:
            became = convert(values, values.pop(key))
            print(
                f"note: {source}: {section}.{key} is deprecated, read as {became}; update the recipe", file=sys.stderr
            )


# A run has one budget: one given on the command line replaces the recipe's, whichever kind it is.
BUDGETS = ("train.max_steps", "train.max_tokens", "train.max_epochs")


def _as_typed(option: str, value: Any) -> str:
    """A flag as the user typed it: --max-steps 20, --compile, --no-packing, SOURCES a.txt b.txt."""
    if isinstance(value, bool):
        return option if value else option.replace("--", "--no-", 1)
    return f"{option} {' '.join(map(str, value)) if isinstance(value, list) else value}"


def build_config(raw: dict[str, Any], source: str | None = None, origins: dict[str, str] | None = None) -> RunConfig:
    """Validate a raw mapping into a RunConfig; errors name the dotted key and suggest the closest one.

    An error names where the bad key came from: its entry in `origins` (dotted key -> what set it: a `--set`, a
    flag), else the recipe file `source` at the key's line, else nothing more than the key."""
    _read_renamed(raw, source or "config")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_describe(exc, source, origins or {})) from None


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    options: dict[str, str] | None = None,
) -> RunConfig:
    """Resolve defaults < YAML < --set overrides < typed flags (dotted keys; None means 'not given').

    An error in a flag's value names its option: `options[key]`, else the key's last part (--max-steps)."""
    raw = read_yaml(path) if path is not None else {}
    origins: dict[str, str] = {}
    for assignment in overrides or []:
        apply_override(raw, assignment)
        origins[assignment.partition("=")[0].strip()] = f"--set {assignment}"
    for key, value in (flags or {}).items():
        if value is not None:
            apply_override(raw, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}")
            origins[key] = _as_typed((options or {}).get(key) or "--" + key.rsplit(".", 1)[-1].replace("_", "-"), value)
    if any(key in origins for key in BUDGETS):  # `--max-steps 20` on a recipe that budgets epochs: a new budget
        for key in BUDGETS:
            if key not in origins:
                apply_override(raw, f"{key}=null")
    config = build_config(raw, str(path) if path is not None else None, origins)
    if path is not None:
        config._recipe = str(yaml_path(path))
    return config


def input_paths(config: BaseModel, skip: Iterable[str] = ()) -> list[str]:
    """Every path `config` makes a command read: the fields marked READS (dotted names in `skip` left out), with a
    glob source read as the folder it starts in and 'harness:FILE' as the file; 'builtin:' and 'hf:' names are no
    paths. A RunConfig read from a recipe file adds that file. Names that do not exist are left to the caller."""
    skipped = set(skip)
    found = [config._recipe] if isinstance(config, RunConfig) and config._recipe else []
    for key, value in _marked(config, ""):
        if key in skipped:
            continue
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, str) or item.startswith(("builtin:", "hf:")):
                continue
            if key == "finetune.grpo.rewards":  # SPEC@WEIGHT reads SPEC
                item = item.rpartition("@")[0] if "@" in item else item
            if item.startswith("harness:"):  # a task by name, or the task file harness:FILE.yaml
                item = item.removeprefix("harness:")
                if not item.endswith((".yaml", ".yml")):
                    continue
            parts = Path(item).parts
            literal = [part for part in parts if not any(char in part for char in "*?[")]
            found.append(str(Path(*literal)) if len(literal) < len(parts) and literal else item)
    return found


def _marked(config: BaseModel, prefix: str) -> Iterator[tuple[str, Any]]:
    for name, info in type(config).model_fields.items():
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            yield from _marked(value, f"{prefix}{name}.")
        elif isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("reads") and value is not None:
            yield f"{prefix}{name}", value


SECRET_NAME = re.compile(r"(token|secret|password|api_?key)$", re.IGNORECASE)


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML, in schema order, with every secret-like field removed (null)."""
    return yaml.safe_dump(_redact(config.model_dump(mode="json")), sort_keys=False)


def _redact(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: None if SECRET_NAME.search(str(key)) else _redact(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_redact(value) for value in node]
    return node


def _describe(exc: ValidationError, source: str | None, origins: dict[str, str]) -> str:
    """One line for the first validation error, starting with where the key was set."""
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc)
    where = _origin(loc, origins) or _file_line(source, loc)
    if error["type"] == "extra_forbidden":
        near = closest(loc[-1], _fields_at(loc[:-1]))
        # else the name may be right and the section not (train.lr is optimizer.lr)
        elsewhere = [dotted for dotted in _all_keys(RunConfig) if dotted.rsplit(".", 1)[-1] == loc[-1]]
        suggestions = [".".join([*loc[:-1], near])] if near else elsewhere
        hint = f" (did you mean {' or '.join(repr(s) for s in suggestions)}?)" if suggestions else ""
        return f"{where}unknown config key '{key}'{hint}"
    message = error["msg"].removeprefix("Value error, ")
    # A value no member of a union takes (true, false or auto): pydantic files one error per member, each under a
    # tag appended to the key; name the key itself, with what each member accepts.
    members = [
        e for e in exc.errors() if [str(p) for p in e["loc"][:-1]] == loc[:-1] and e.get("input") == error.get("input")
    ]
    if len(loc) > 1 and len(members) > 1:
        loc, key = loc[:-1], ".".join(loc[:-1])
        message = "should be " + " or ".join(e["msg"].removeprefix("Input should be ").split(",")[0] for e in members)
    if not key:
        return f"{where}{message}"
    given = error.get("input")
    secret = SECRET_NAME.search(loc[-1])
    shown = "" if isinstance(given, dict) or given is None or secret else f" (got {_short_repr(given)})"
    return f"{where}config key '{key}': {message}{shown}"


def _origin(loc: list[str], origins: dict[str, str]) -> str:
    """What set the key at `loc`, as the line's start: the `--set` or option that gave it or a section above it (the
    last one given wins, as in the config); for a rule over a section's keys, every `--set` of a key in it; '' if
    none did."""
    key = ".".join(loc)
    above = [origin for k, origin in origins.items() if k == key or key.startswith(f"{k}.")]
    if above:
        return f"{above[-1]}: "
    inside = [o for k, o in origins.items() if k.startswith(f"{key}.") and o.startswith("--set ")] if key else []
    return f"{', '.join(inside)}: " if inside else ""


def _file_line(source: str | None, loc: list[str]) -> str:
    """'FILE:LINE: ' for the key at `loc` in the recipe file `source` (the line of the deepest part of it the file
    has), 'FILE: ' when the file lacks even its section, '' for no file."""
    if source is None:
        return ""
    try:
        node = yaml.compose(yaml_path(source).read_text(encoding="utf-8-sig"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, UserError):
        return ""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part]
            if not found:
                break
            key_node, node = found[-1]
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            break
    return f"{source}:{line}: " if line else f"{source}: "


def _short_repr(value: Any) -> str:
    """A value for an error message, never longer than a line (a list may hold millions of items)."""
    import reprlib

    short = reprlib.Repr()
    short.maxstring, short.maxother, short.maxlist, short.maxdict, short.maxlevel = 80, 80, 6, 6, 3
    return short.repr(value)


def _all_keys(model: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a section and the sections inside it."""
    keys = []
    for name, field in model.model_fields.items():
        nested = _is_section(field.annotation)
        keys += _all_keys(field.annotation, f"{prefix}{name}.") if nested else [f"{prefix}{name}"]
    return keys


def _fields_at(path: list[str]) -> list[str]:
    """The valid field names of the section at a dotted path."""
    model: type[BaseModel] = RunConfig
    for part in path:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


REFERENCE_HEADER = """# Configuration reference

Every training command reads one typed configuration (`llmkit/config.py`). A recipe YAML sets any of these keys;
`--set dotted.key=value` overrides them; typed flags (`--lr`, `--max-steps`, ...) override both. A run has one
budget (`train.max_steps`, `max_tokens` or `max_epochs`): one given on the command line replaces the recipe's, of
whichever kind. An unknown key is an error that names it and suggests the closest valid key. See a recipe fully
resolved with `llmkit config show recipes/tiny-cpu.yaml`.

This page is generated from the schema by `make docs` (`llmkit config keys`); a test checks it is current.
"""


def describe_keys() -> str:
    """Every config key as a Markdown table per section: key, default, description (the reference docs)."""
    lines: list[str] = [REFERENCE_HEADER]
    fields = RunConfig.model_fields
    top = [(name, field) for name, field in fields.items() if not _is_section(field.annotation)]
    sections: list[tuple[str, Any]] = [(n, f.annotation) for n, f in fields.items() if _is_section(f.annotation)]
    for title, rows, doc in [("top level", _rows("", top), "")] + [
        (name, _rows(f"{name}.", list(model.model_fields.items())), " ".join((model.__doc__ or "").split()))
        for name, model in sections
    ]:
        lines += [f"## {title}", ""] + ([doc, ""] if doc else [])
        lines += ["| key | default | description |", "| --- | --- | --- |", *rows, ""]
    return "\n".join(lines)


def _rows(prefix: str, fields: list[tuple[str, Any]]) -> list[str]:
    rows = []
    for name, field in fields:
        if _is_section(field.annotation):  # a nested section, e.g. finetune.lora
            rows += _rows(f"{prefix}{name}.", list(field.annotation.model_fields.items()))
            continue
        default = field.get_default(call_default_factory=True)
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append(f"| `{prefix}{name}` | `{shown}` | {field.description or ''} |")
    return rows


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Section)
