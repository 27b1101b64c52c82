"""Validation of the workflow's config and cohort table against the JSON schemas in workflow/schemas/.

Snakemake's own ``validate`` reports jsonschema's raw message; a user with a typo in a nested key wants to
read which key is wrong and what is allowed there. These functions give that one line, fill in the
schema's defaults, and check a cohort table's columns before any job starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from pathmil.errors import PathmilError


def _load(schema_path: str | os.PathLike) -> dict[str, Any]:
    return yaml.safe_load(Path(schema_path).read_text())


def _where(path: list[Any]) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _message(error: Any, what: str) -> str:
    """One line for a jsonschema error: the key at fault and what is allowed."""
    where = _where(list(error.absolute_path))
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        prefix = "" if where == "(top level)" else f"{where}."
        return f"{what}: unknown key '{prefix}{extra[0]}'; allowed: {', '.join(allowed)}"
    if error.validator == "required":
        return f"{what}: {where} lacks {error.message.split(' is a required')[0]}"
    if error.validator == "enum":
        return f"{what}: {where} is {error.instance!r}; allowed: {', '.join(map(str, error.validator_value))}"
    if error.validator == "oneOf" and isinstance(error.instance, dict):
        options = [" or ".join(s.get("required", [])) for s in error.validator_value]
        return f"{what}: {where} must name exactly one of {', '.join(options)}"
    description = error.schema.get("description", "")
    return f"{what}: {where}: {error.message}" + (f" ({description})" if description else "")


def _fill_defaults(instance: Any, schema: dict[str, Any]) -> None:
    if not isinstance(instance, dict):
        return
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = sub["default"]
        if key in instance:
            _fill_defaults(instance[key], sub)


def validate_config(config: dict[str, Any], schema_path: str | os.PathLike) -> None:
    """Check a workflow config (in place: schema defaults filled in); raise one clear line on error."""
    import jsonschema

    schema = _load(schema_path)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        deepest = max(errors, key=lambda e: len(e.absolute_path))
        chosen = deepest if deepest.validator == "additionalProperties" else best
        raise PathmilError(_message(chosen, "config"))
    _fill_defaults(config, schema)


def validate_table_columns(
    table_path: str | os.PathLike, schema_path: str | os.PathLike, extra_required: list[str] = ()
) -> None:
    """Check that a cohort table has the columns the schema and the configured tasks need."""
    import pandas as pd

    path = Path(table_path)
    if not path.is_file():
        raise PathmilError(f"cohort table {path} does not exist (slides.table in the config)")
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    columns = list(pd.read_csv(path, sep=sep, nrows=0).columns.str.strip())
    required = list(_load(schema_path).get("required", [])) + list(extra_required)
    missing = [c for c in dict.fromkeys(required) if c not in columns]
    if missing:
        raise PathmilError(
            f"cohort table {path} lacks column(s) {', '.join(missing)}; it has {', '.join(columns)}"
        )
