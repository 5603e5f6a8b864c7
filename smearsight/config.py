"""Typed, validated configuration objects, loadable from YAML.

Every config is a pydantic model that forbids unknown fields, so a typo in a YAML file is an error that
names the field instead of a silently ignored setting. Model settings (what gets exported) are kept in
separate classes from training settings (how it is trained).
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from smearsight.errors import InputError

T = TypeVar("T", bound="StrictConfig")


class StrictConfig(BaseModel):
    """Base for every config: unknown fields are errors, values are validated on assignment too, and float
    fields refuse NaN and infinity (YAML ``.inf``, ``1e400`` pass a bare ``gt=0`` and would only show up as a
    crash or NaN losses mid-training)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], source: str = "<config>") -> T:
        """Validate ``data``; raise :class:`InputError` with one line naming the first bad field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InputError(format_validation_error(exc, source)) from None

    @classmethod
    def from_yaml(cls: type[T], path: str | Path, section: str | None = None) -> T:
        """Load from a YAML file (optionally one top-level ``section`` of it)."""
        data = read_yaml(path)
        if section is not None:
            data = data.get(section) or {}
            if not isinstance(data, dict):
                raise InputError(f"{path}: section '{section}' must be a mapping")
        return cls.from_dict(data, source=str(path) + (f" [{section}]" if section else ""))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict (for checkpoints and manifests)."""
        return self.model_dump(mode="json")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; one-line errors for a missing file, bad YAML or a non-mapping top level."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_unique_key_loader())  # a SafeLoader
    except _DuplicateKey as exc:
        raise InputError(f"{path}: line {exc.line}: {exc.what} given twice (each setting once)") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: cannot read the config file (not UTF-8: byte {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data


class _DuplicateKey(Exception):
    def __init__(self, what: str, line: int) -> None:
        super().__init__(what)
        self.what, self.line = what, line


@functools.cache
def _unique_key_loader() -> type:
    """yaml.SafeLoader that raises :class:`_DuplicateKey` where a mapping repeats a key: PyYAML keeps the
    last one, so the first setting would be silently ignored."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base" may be overridden on purpose
                    continue
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, Hashable) and key in seen:
                    raise _DuplicateKey(f"key {key!r}", key_node.start_mark.line + 1)
                if isinstance(key, Hashable):
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line: ``source: field.path: message (got value)`` for the first error, plus a count."""
    errors = exc.errors()
    first = errors[0]
    loc = _user_loc(first) or "<root>"
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        msg = f"{source}: unknown field '{loc}'"
        others = len(errors) - 1
    else:
        # A value no branch of a union accepts fails once per branch at the same field: say every form it may take.
        same = [e for e in errors if (_user_loc(e) or "<root>") == loc and e.get("type") != "extra_forbidden"]
        texts = list(dict.fromkeys(e.get("msg", "invalid") for e in same))
        got = first.get("input")
        got_text = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
        msg = f"{source}: field '{loc}': {'; or '.join(texts)}{got_text}"
        others = len(errors) - len(same)
    if others > 0:
        msg += f" (+{others} more)"
    return msg


def _user_loc(error: Any) -> str:
    # Pydantic names the branch of a union it tried ("function-after[_check(), AnchorConfig]", "literal['auto']"):
    # no key of the user's file, so left out of the path.
    return ".".join(str(part) for part in error.get("loc", ()) if not (isinstance(part, str) and "[" in part))
