"""The base of every stage's settings: typed, bounded, documented fields, valid from the moment they are built.

Each stage declares its settings once, beside the code that uses them, as a :class:`Settings` subclass
(pydantic, as STAMP does): a field's type, default, bounds (``ge``, ``gt``, ...), choices (``Literal``) and
help text (``description``) live in one declaration. Everything else derives from it: the command-line
flags and their help (:func:`add_flags`), the workflow's JSON schema and the tables of config/README.md
(:mod:`pathmil.config`), ``pathmil config --defaults``. Unknown keys are refused, so a typo never falls back
to a default silently; a bad value is one line naming the key (:func:`settings_error`).
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, create_model, model_serializer

from pathmil.errors import PathmilError

S = TypeVar("S", bound="Settings")


class Settings(BaseModel):
    """Settings of one stage or model: ``TileConfig(tile_px=224)``; ``.to_dict()`` gives plain data.

    ``section`` names the config section the settings come from, for messages (``tile.tile_px``).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)
    section: ClassVar[str] = "config"

    @classmethod
    def build(cls: type[S], data: dict[str, Any] | None = None, where: str | None = None) -> S:
        """Build from plain data; a bad key or value is a :class:`PathmilError` of one line."""
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as err:
            raise settings_error(err, cls, where or cls.section) from None

    def replace(self: S, **changes: Any) -> S:
        """A copy with ``changes`` applied, validated like a new object."""
        return type(self).build({**self.model_dump(), **changes}, self.section)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON types), as checkpoints, provenance and YAML files keep it."""
        return self.model_dump(mode="json")


def settings_error(err: ValidationError, cls: type[BaseModel], where: str) -> PathmilError:
    """The first problem of a pydantic validation error as one line naming the key."""
    errors = err.errors()
    first = errors[0]
    loc = _plain_loc(first["loc"])
    key = ".".join([where, *loc]) if loc else where
    if first["type"] == "extra_forbidden":
        allowed = sorted(_fields_at(cls, loc[:-1]))
        return PathmilError(f"unknown setting {key}; allowed: {', '.join(allowed)}")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("value_error", "assertion_error") and not loc:
        return PathmilError(f"{where}: {message}")
    if sum(_plain_loc(e["loc"]) == loc for e in errors) > 1:  # a value fitting no member of a union
        field = _field_at(cls, loc)
        expected = field.description if field is not None and field.description else "another value"
        return PathmilError(f"setting {key}: {first.get('input')!r} is not allowed; expected {expected}")
    return PathmilError(f"setting {key}: {message} (got {first.get('input')!r})")


def _plain_loc(loc: tuple[Any, ...]) -> list[str]:
    """A pydantic error location without its type tags (``literal['x']``, ``list[float]``) and indices."""
    return [str(part) for part in loc if isinstance(part, str) and "[" not in part]


def _field_at(cls: type[BaseModel], loc: list[str]) -> Any:
    """The field of the (nested) model at ``loc``, or None."""
    model: Any = cls
    field = None
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = settings_class_in(field.annotation)
    return field


def _fields_at(cls: type[BaseModel], loc: list[str]) -> list[str]:
    """Field names of the (nested) model at ``loc``; an empty list where it cannot be followed."""
    model: Any = cls
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = settings_class_in(field.annotation)
    return list(getattr(model, "model_fields", {}))


def settings_class_in(annotation: Any) -> Any:
    """The settings class inside an annotation such as ``TissueConfig | None`` (None if there is none)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = settings_class_in(arg)
        if found is not None:
            return found
    return None


class Overrides(Settings):
    """Settings that override some fields of another settings class; unset fields (None) are left out."""

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


def partial(cls: type[S], name: str, include: list[str] | None = None) -> type[Overrides]:
    """A settings class with the fields of ``cls`` (or those in ``include``), same types and bounds, each
    optional with default None: overrides of some settings, the rest left as they are."""
    import copy

    fields = {}
    for field_name in include or list(cls.model_fields):
        optional = copy.copy(cls.model_fields[field_name])
        optional.default = None
        optional.default_factory = None
        fields[field_name] = (cls.model_fields[field_name].annotation | None, optional)
    return create_model(name, __base__=Overrides, __doc__=f"Overrides of {cls.__name__}", **fields)


def subset(cls: type[S], name: str, include: list[str], doc: str, **extra: Any) -> type[Settings]:
    """A settings class with some fields of ``cls`` (defaults, types and bounds kept) and ``extra`` ones
    (``name=(type, Field(...))``)."""
    fields = {field: (cls.model_fields[field].annotation, cls.model_fields[field]) for field in include}
    return create_model(name, __base__=Settings, __doc__=doc, **fields, **extra)


# ------------------------------------------------------------------------------- command-line flags


def choices_of(annotation: Any) -> list[Any] | None:
    """The allowed values of a ``Literal`` annotation (also inside ``X | None``)."""
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = choices_of(arg)
            if found:
                return found
    return None


def _scalar_type(annotation: Any) -> type:
    """The Python type a flag parses to (int, float, str or bool), from a field's annotation."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0])
    if typing.get_origin(annotation) in (tuple, list):
        return _scalar_type(typing.get_args(annotation)[0])
    choices = choices_of(annotation)
    if choices:
        return type(choices[0])
    return annotation if annotation in (int, float, str, bool) else str


def describe_default(cls: type[Settings], name: str) -> str:
    """A field's default as the help text shows it ("none" for None)."""
    default = cls.model_fields[name].get_default(call_default_factory=True)
    if default is None:
        return "none"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, tuple):
        return str(list(default))
    return str(default)


def describe_bounds(field: Any) -> str:
    """A field's bounds as text (">= 0, < 1"), from its ``ge``/``gt``/``le``/``lt`` constraints."""
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = []
    for constraint in field.metadata:
        for attr, sign in signs.items():
            value = getattr(constraint, attr, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return ", ".join(parts)


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type[Settings],
    names: list[str],
    flags: dict[str, str] | None = None,
) -> None:
    """Add a ``--flag`` per field in ``names`` with the field's type, choices and help (default included).

    ``flags`` renames a field's flag (``{"default_mpp": "--mpp"}``). A flag left out of the command line is
    None, so the config file's value (or the default) stands; a bool field becomes a switch that sets True.
    """
    for name in names:
        field = cls.model_fields[name]
        flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
        help_text = f"{field.description or name} (default {describe_default(cls, name)})".replace("%", "%%")
        kind = _scalar_type(field.annotation)
        if kind is bool:
            parser.add_argument(flag, dest=name, action="store_true", default=None, help=help_text)
            continue
        parser.add_argument(
            flag,
            dest=name,
            type=kind,
            nargs=_nargs(field.annotation),
            choices=choices_of(field.annotation),
            default=None,
            help=help_text,
        )


def _nargs(annotation: Any) -> int | str | None:
    """How many values a flag takes: a tuple's length, '+' for a list, else one."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        found = [_nargs(a) for a in typing.get_args(annotation) if a is not type(None)]
        return found[0] if found else None
    if origin is tuple:
        return len(typing.get_args(annotation))
    if origin is list:
        return "+"
    return None


def given_flags(args: argparse.Namespace, cls: type[Settings]) -> dict[str, Any]:
    """The settings of ``cls`` given as flags on the command line (None: not given)."""
    return {name: getattr(args, name) for name in cls.model_fields if getattr(args, name, None) is not None}
