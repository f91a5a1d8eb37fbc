"""The configuration reference, from the schema itself: every key's meaning (the comment beside or above its
field in schema.py and cluster.py), type, default, accepted values and limits. `--help [PREFIX]` prints it and
docs/configuration.md is generated from it (`python -m engine.config.reference docs/configuration.md`; `make
test` fails when the page is stale or a key has no meaning). Standard library only: --help must stay fast."""

from __future__ import annotations

import ast
import dataclasses
import io
import sys
import tokenize
import typing
from dataclasses import dataclass
from enum import Enum
from functools import cache
from pathlib import Path

from engine.config import cluster, metric_registry, schema, scoring
from engine.config.schema import Config

HERE = Path(__file__).parent
PAGE_HEAD = """# Configuration reference

Generated from the config schema (`engine/config/schema.py`, `scoring.py`, `cluster.py`) by
`python -m engine.config.reference docs/configuration.md`; `make test` fails when this page is stale.
`python -m engine.run --help PREFIX` prints the same, e.g. `--help model` or `--help train.lr`.
Set a key in a YAML file (`section: {key: value}`) or on the command line as `section.key=value`.
"""


@dataclass(frozen=True)
class Key:
    path: str  # e.g. "train.lr"
    type: str
    default: str
    accepted: str  # choices or limits; "" when any value of the type is accepted
    meaning: str


def meanings_in(source: str) -> dict[tuple[str, str], str]:
    """{(class, field): meaning} of every annotated field of every class in `source`: the comment at the end of
    the field's line, after the comment lines right above it (joined; "" when there is none)."""
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(token.start[0])
    found = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            above, line = [], item.lineno - 1
            while line in comments and line not in code_lines:
                above.insert(0, comments[line])
                line -= 1
            beside = [comments[n] for n in range(item.lineno, item.end_lineno + 1) if n in comments]
            found[(node.name, item.target.id)] = " ".join(above + beside)
    return found


@cache
def _meanings() -> dict[tuple[str, str], str]:
    return {k: v for name in ("schema.py", "scoring.py", "cluster.py")
            for k, v in meanings_in((HERE / name).read_text()).items()}


def _type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if origin in (list, typing.List):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, typing.Dict):
        return "mapping"
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "choice"
    return getattr(hint, "__name__", str(hint))


def _text(value) -> str:
    if isinstance(value, Enum):
        return str(value.value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"' if value == "" else value
    if isinstance(value, (list, dict)):
        return repr(value).replace("'", "")
    return repr(value)


def _accepted(hint, limits: dict) -> str:
    base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if isinstance(base[0], type) and issubclass(base[0], Enum):
        return ", ".join(m.value for m in base[0])
    words = {"ge": ">= {}", "gt": "> {}", "le": "<= {}", "length": "{} values"}
    parts = [words[k].format(v) for k, v in limits.items() if k in words]
    if "pattern" in limits:
        parts.append(limits["pattern"][1].replace("is not ", "", 1))
    return ", ".join(parts)


def keys(node=None, prefix: str = "") -> list[Key]:
    """Every key under `node` (a schema dataclass instance; the whole Config by default), in schema order."""
    node = Config() if node is None else node
    hints = typing.get_type_hints(type(node), vars(schema) | vars(scoring) | vars(cluster))
    out = []
    for f in dataclasses.fields(node):
        value, path = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out += keys(value, f"{path}.")
            continue
        accepted = _accepted(hints[f.name], dict(f.metadata))
        if path == "metrics.key":
            accepted = ", ".join(metric_registry.selectable())
        out.append(Key(path, _type_name(hints[f.name]), _text(value), accepted,
                       _meanings().get((type(node).__name__, f.name), "")))
    return out


def matching(prefix: str) -> list[Key]:
    """The keys at or under `prefix` ("model", "train.lr"); every key for ""."""
    prefix = prefix.strip(".")
    return [k for k in keys() if not prefix or k.path == prefix or k.path.startswith(prefix + ".")]


def help_text(prefix: str = "") -> str:
    """`--help`'s reference: one key a line (type, default, accepted values), its meaning indented below."""
    lines = []
    for k in matching(prefix):
        accepted = f"; {k.accepted}" if k.accepted else ""
        lines.append(f"  {k.path} ({k.type}, default {k.default}{accepted})")
        lines.append(f"      {k.meaning}")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def page() -> str:
    """docs/configuration.md: one table per section."""
    sections: dict[str, list[Key]] = {}
    for k in keys():
        sections.setdefault(k.path.split(".")[0] if "." in k.path else "(top level)", []).append(k)
    out = [PAGE_HEAD]
    for name, section in sections.items():
        out.append(f"\n## {name}\n\n| key | type | default | accepted | meaning |\n|---|---|---|---|---|")
        out += [f"| `{k.path}` | {_cell(k.type)} | `{_cell(k.default)}` | {_cell(k.accepted)} | {_cell(k.meaning)} |"
                for k in section]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    """`python -m engine.config.reference PATH` writes the page; `--check PATH` exits 1 when PATH is stale."""
    check = "--check" in argv
    path = Path([a for a in argv if a != "--check"][0])
    missing = [k.path for k in keys() if not k.meaning]
    if missing:
        print(f"keys without a meaning (a comment beside or above the field): {', '.join(missing)}", file=sys.stderr)
        return 1
    if check:
        if not path.is_file() or path.read_text() != page():
            print(f"{path} is stale: run python -m engine.config.reference {path}", file=sys.stderr)
            return 1
        return 0
    path.write_text(page())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
