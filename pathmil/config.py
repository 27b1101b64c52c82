"""Loading settings, and the whole-run config the workflow reads.

A stage's settings come, in order of precedence, from their declared defaults (each stage's
:class:`~pathmil.settings.Settings` class), a YAML file (``--config``, the stage's section of it), ``--set
key=value`` overrides with dotted keys (``--set tissue.sthresh=15``) and the command's own flags
(:func:`load_settings`). A config file may hold every section of a whole run (``config/config.yaml``); a
section no stage reads (``trian:``) is refused, naming it.

The whole-run config (:func:`run_config_class`: cohort, slides, tasks, aggregators, per-aggregator models and
each stage's section) is assembled from the stages' declarations. From it come the workflow's JSON schema
(:func:`workflow_schema`, written to ``workflow/schemas/config.schema.yaml``), the tables of
``config/README.md`` (:func:`markdown_tables`) and ``pathmil config --defaults``; tests hold the committed
files equal to what these functions make. Stage modules are imported only by those functions, so loading a
tile's settings never imports torch.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pathmil.errors import PathmilError
from pathmil.settings import Settings, partial, subset

S = TypeVar("S", bound=Settings)

# The top-level sections of a whole-run config (a test holds this equal to run_config_class()'s fields).
SECTIONS = (
    "cohort",
    "slides",
    "tile",
    "extract",
    "split",
    "tasks",
    "aggregators",
    "seeds",
    "train",
    "search",
    "models",
    "evaluate",
    "plots",
    "heatmap",
    "report",
    "slurm",
    "package",
    "deploy",
    "transfer",
)


# ---------------------------------------------------------------------------------------------- loading


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, bad YAML (with its line) or a non-mapping is one line."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise PathmilError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise PathmilError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise PathmilError(f"config file {path} must hold a mapping of settings")
    return data


def check_sections(data: dict[str, Any], path: str | Path) -> None:
    """Refuse top-level keys that no stage reads (a misspelt section would silently keep every default)."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise PathmilError(
            f"config file {path}: unknown section '{unknown[0]}'; sections: {', '.join(SECTIONS)}"
        )


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into ``{"a": {"b": 1}, "c": "x"}``; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise PathmilError(f"--set expects key=value, got '{pair}'")
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return nested


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated by ``update``, merging nested mappings key by key."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(
    cls: type[S],
    path: str | Path | list[str | Path] | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    section: str | None = None,
) -> S:
    """Defaults, then the YAML files' sections (``cls.section`` unless named; dotted for a nested one,
    e.g. ``slides.demo``; later files win), then ``--set``, then flags.

    ``flags`` holds values given as dedicated command-line flags (those not given are left out).

    Raises:
        PathmilError: an unreadable file, an unknown section or key, or a bad value (one line naming it).
    """
    section = section or cls.section
    data: dict[str, Any] = {}
    for one in [] if path is None else path if isinstance(path, list) else [path]:
        content = read_yaml(one)
        check_sections(content, one)
        part: Any = content
        for key in section.split("."):
            part = (part.get(key) if isinstance(part, dict) else None) or {}
        if not isinstance(part, dict):
            raise PathmilError(f"config file {one}: section '{section}' must be a mapping of settings")
        data = deep_merge(data, part)
    data = deep_merge(data, parse_overrides(overrides))
    data = deep_merge(data, {k: v for k, v in (flags or {}).items() if v is not None})
    return cls.build(data, section)


# ------------------------------------------------------------------------------------ the whole run


@functools.cache
def run_config_class() -> type[Settings]:
    """The whole-run config (what ``config/config.yaml`` holds), assembled from the stages' settings."""
    from typing import Literal

    from pydantic import Field, field_validator, model_validator

    from pathmil.data.splits import SplitConfig
    from pathmil.demo import DemoConfig
    from pathmil.evaluation.heatmap import HeatmapConfig
    from pathmil.evaluation.settings import EvaluateConfig, PlotConfig
    from pathmil.features.extract import ExtractConfig
    from pathmil.slide.tile import TileConfig
    from pathmil.training.run import TrainConfig
    from pathmil.training.search import SearchConfig

    class SlidesConfig(Settings):
        """Where the slides come from: exactly one of demo, table, dir."""

        section = "slides"
        demo: DemoConfig | None = Field(None, description="make the synthetic demo cohort")
        table: str | None = Field(
            None,
            description="cohort table (CSV, or TSV by extension): slide_id, patient_id, path, optional mpp "
            "and tissue (a GeoJSON outline), and the label columns of the tasks",
        )
        dir: str | None = Field(
            None, description="folder of slides (ids from file names; tiling and extraction only)"
        )

        @model_validator(mode="after")
        def _exactly_one(self) -> SlidesConfig:
            given = [name for name in ("demo", "table", "dir") if getattr(self, name) is not None]
            if len(given) != 1:
                raise ValueError(f"slides must name exactly one of demo, table, dir (got {given or 'none'})")
            return self

    ExtractOverrides = partial(ExtractConfig, "ExtractOverrides")

    class ExtractJob(ExtractConfig):
        """``extract`` settings plus the workflow's per-job resources and its encoder grid."""

        encoder: str | list[str] = Field(  # type: ignore[assignment]
            "resnet50_trunc",
            description="encoder (registry name or timm:<model_name>), or a list of them (a grid)",
        )
        per_encoder: dict[str, ExtractOverrides] = Field(  # type: ignore[valid-type]
            default_factory=dict,
            description="settings of one encoder of the list (e.g. its weights, random_init)",
        )
        threads: int = Field(2, ge=1, description="compute threads per extraction job (the rule's threads)")
        gpus: int = Field(0, ge=0, description="GPUs per extraction job (on SLURM: --gpus)")

        @field_validator("encoder")
        @classmethod
        def _known_encoder(cls, value: str | list[str]) -> str | list[str]:  # each of the list
            for name in [value] if isinstance(value, str) else value:
                ExtractConfig._known_encoder(name)
            return value

    SplitJob = subset(
        SplitConfig,
        "SplitJob",
        [n for n in SplitConfig.model_fields if n not in WORKFLOW_OWNED_SPLIT_FIELDS],
        "patient-level folds of every task (bag_level and task_options come from each task's train settings)",
    )
    run_fields = [n for n in TrainConfig.model_fields if n not in WORKFLOW_OWNED_TRAIN_FIELDS]
    TrainJob = subset(
        TrainConfig,
        "TrainJob",
        run_fields,
        "train settings for every run of the workflow, plus the per-job GPUs",
        gpus=(int, Field(0, ge=0, description="GPUs per training job (on SLURM: --gpus)")),
    )
    TrainOverrides = partial(TrainConfig, "TrainOverrides", run_fields)

    class TaskEntry(Settings):
        """A task to train: its label columns and options."""

        target: list[str] | None = Field(None, description="label column(s); none: the task's defaults")
        task_options: dict[str, Any] = Field(default_factory=dict, description="the task's settings")
        train: TrainOverrides = Field(
            default_factory=TrainOverrides, description="train settings of this task"
        )  # type: ignore[valid-type]

    class ModelEntry(TrainOverrides):  # type: ignore[valid-type, misc]
        """Settings of one aggregator's runs: its ``model`` (and ``mhim``) sections and train settings."""

        model: dict[str, Any] = Field(default_factory=dict, description="the aggregator's settings")
        mhim: dict[str, Any] = Field(default_factory=dict, description="MHIM-MIL settings (mhim_* only)")

    from pathmil.evaluation.report import MAX_THUMBNAILS

    class ReportConfig(Settings):
        """What ``snakemake --report`` shows."""

        section = "report"
        heatmaps: int = Field(2, ge=0, description="slides per task and aggregator with a heatmap")
        qc_thumbnails: int = Field(
            MAX_THUMBNAILS, ge=0, description="slides in the QC gallery at most (failed slides first)"
        )

    class SlurmConfig(Settings):
        """What the workflow asks SLURM for (workflow/rules/resources.smk; the profile sets the rest)."""

        section = "slurm"
        max_runtime: float = Field(
            24.0,
            gt=0,
            description="hours one SLURM job may ask for at most: per-slide batches (tiling and extraction) are "
            "filled to half of it, so a retry can double its time and no attempt asks for more",
        )
        seconds_per_tile: float | None = Field(
            None,
            gt=0,
            description="extraction seconds per tile (a bag's facts JSON gives tiles_per_second); none: "
            "estimated from the encoder's FLOPs and the device",
        )

    class DeployConfig(Settings):
        """A package applied to this cohort's slides: an external test set, or new slides to score."""

        section = "deploy"
        package: str = Field(
            description="a package (`pathmil package`); the cohort's slides are tiled and encoded as its "
            "training bags were, and its fold models score them"
        )
        heatmaps: int = Field(
            2, ge=0, description="slides with a heatmap of the package's models in the report"
        )

    class TransferConfig(Settings):
        """Knowledge transfer into this cohort: its folds trained from source models beside from scratch."""

        section = "transfer"
        sources: list[str] = Field(
            min_length=1, description="source packages (`pathmil package` of other cohorts, same encoder)"
        )
        baseline: str = Field(
            "abmil", description="the aggregator trained from scratch and fine-tuned (one of aggregators)"
        )
        strategies: list[Literal["finetune", "moe_pkt"]] = Field(
            ["finetune", "moe_pkt"],
            min_length=1,
            description="finetune: the baseline started from each source (train.init_from); moe_pkt: "
            "MoE-PKT over all sources (settings: models.moe_pkt)",
        )
        tasks: list[Literal["classification", "survival", "regression"]] | None = Field(
            None, description="the tasks to transfer (none: every task of the cohort)"
        )

    class RunConfig(Settings):
        """A whole run of the workflow: one cohort, its tasks and aggregators, and every stage's settings."""

        cohort: str = Field(
            pattern=r"^[A-Za-z0-9_.-]+$", description="name of the cohort; outputs go to results/<cohort>/"
        )
        slides: SlidesConfig
        tile: TileConfig = Field(default_factory=TileConfig)
        extract: ExtractJob = Field(default_factory=ExtractJob)
        split: SplitJob = Field(default_factory=SplitJob)  # type: ignore[valid-type]
        tasks: dict[Literal["classification", "survival", "regression"], TaskEntry | None] = Field(
            default_factory=dict, description="the tasks to train, each with its label columns and options"
        )
        aggregators: list[str] = Field(["abmil"], min_length=1, description="the aggregators to train")
        seeds: list[int] = Field(
            [0], min_length=1, description="training seeds: each configuration is trained once per seed"
        )
        train: TrainJob = Field(default_factory=TrainJob)  # type: ignore[valid-type]
        search: SearchConfig = Field(default_factory=SearchConfig)
        models: dict[str, ModelEntry] = Field(
            default_factory=dict, description="per-aggregator settings merged over train"
        )
        evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
        plots: PlotConfig = Field(default_factory=PlotConfig)
        heatmap: HeatmapConfig = Field(default_factory=HeatmapConfig)
        report: ReportConfig = Field(default_factory=ReportConfig)
        slurm: SlurmConfig = Field(default_factory=SlurmConfig)
        package: bool = Field(
            False,
            description="package every task x aggregator's fold models with a model card "
            "(results/<cohort>/packages/<task>/<encoder>/<aggregator>.pathmil; the first seed)",
        )
        deploy: DeployConfig | None = Field(None, description="apply a package to this cohort's slides")
        transfer: TransferConfig | None = Field(None, description="train this cohort from source models too")

    return RunConfig


# train settings the workflow sets per job from its own sections (tasks, aggregators, models)
WORKFLOW_OWNED_TRAIN_FIELDS = ("task", "target", "task_options", "aggregator", "model", "mhim")
# split settings the workflow sets per task from the task's train settings and options (one fact, one place)
WORKFLOW_OWNED_SPLIT_FIELDS = ("bag_level", "task_options")


def defaults_yaml() -> str:
    """Every setting of a whole run with its default, as YAML (``pathmil config --defaults``)."""
    cls = run_config_class()
    data = {}
    for name, field in cls.model_fields.items():
        if field.is_required():
            continue
        default = field.get_default(call_default_factory=True)
        data[name] = default.to_dict() if isinstance(default, Settings) else default
    header = "# pathmil: every setting with its default (cohort and slides have none: name them)\n"
    return header + "cohort: my_cohort\nslides: {table: cohort.csv}\n" + yaml.safe_dump(data, sort_keys=False)


# ---------------------------------------------------------------------------------- workflow schema


def workflow_schema() -> dict[str, Any]:
    """The workflow's JSON schema: the whole-run config with the registries' names and per-key settings.

    Self-contained (no ``$ref``), with defaults on every section, so Snakemake's ``validate`` fills in
    what a config leaves out. Aggregator, encoder and task names are enumerated from the registries; each
    task's ``task_options`` and each aggregator's ``model``/``mhim`` are checked against their own
    declarations. ``x-pathmil`` carries facts the workflow needs without importing pathmil: each wrapper's
    baseline aggregator, each task's default label columns, each encoder's GFLOP per tile, the cap on the
    default number of tile readers.
    """
    from pathmil.features.encoders import encoder_gflops, list_encoders
    from pathmil.features.extract import MAX_DEFAULT_READERS
    from pathmil.ids import SLIDE_EXTENSIONS
    from pathmil.models.checkpoint import PACKAGE_FORMAT_VERSION
    from pathmil.models.mhim import MHIMConfig
    from pathmil.models.registry import baselines, list_models, model_entry
    from pathmil.slide.tissue import TISSUE_PRESETS
    from pathmil.tasks import TASKS

    schema = _inline(run_config_class().model_json_schema())
    props = schema["properties"]
    models = list_models()
    props["aggregators"]["items"] = {"enum": models}
    encoder = props["extract"]["properties"]["encoder"]
    name = {"anyOf": [{"enum": list_encoders()}, {"type": "string", "pattern": "^timm:.+"}]}
    encoder.pop("type", None)
    encoder["anyOf"] = [name, {"type": "array", "items": name, "minItems": 1}]
    task_entry = props["tasks"].pop("additionalProperties")
    props["tasks"]["properties"] = {}
    for name, cls in TASKS.items():
        entry = copy.deepcopy(task_entry["anyOf"][0] if "anyOf" in task_entry else task_entry)
        entry["properties"]["task_options"] = _inline(cls.Options.model_json_schema())
        entry["properties"]["target"]["default"] = list(cls.default_columns)
        props["tasks"]["properties"][name] = entry  # the workflow reads `task:` (empty) as {}
    props["tasks"]["additionalProperties"] = False
    props["tasks"].pop("propertyNames", None)
    model_entry_schema = props["models"].pop("additionalProperties")
    props["models"]["properties"] = {}
    for name in models:
        entry = copy.deepcopy(model_entry_schema)
        registered = model_entry(name)
        entry["properties"]["model"] = _inline(registered.settings.model_json_schema())
        if "mhim" in registered.inputs:
            entry["properties"]["mhim"] = _inline(MHIMConfig.model_json_schema())
        else:
            del entry["properties"]["mhim"]
        props["models"]["properties"][name] = entry
    props["models"]["additionalProperties"] = False
    _tidy(schema)
    for entry in [*props["models"]["properties"].values(), *props["tasks"]["properties"].values()]:
        entry.pop("default", None)  # an aggregator's or a task's entry exists only where the config names it
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["description"] = "pathmil workflow settings; generated by `pathmil config --schema`, do not edit"
    schema["x-pathmil"] = {
        "baselines": baselines(),
        "tissue_presets": {name: preset.to_dict() for name, preset in TISSUE_PRESETS.items()},
        "package_format_version": PACKAGE_FORMAT_VERSION,
        "slide_extensions": list(SLIDE_EXTENSIONS),
        "default_targets": {name: list(cls.default_columns) for name, cls in TASKS.items()},
        "encoder_gflops": {name: round(encoder_gflops(name), 1) for name in list_encoders()},
        "max_default_readers": dict(MAX_DEFAULT_READERS),
    }
    return schema


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace every ``$ref`` by the definition it points to (pathmil's settings do not recurse)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return resolve({**target, **rest})
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def _tidy(node: Any) -> None:
    """Drop titles and null defaults; give object sections an empty default so nested defaults fill in."""
    if isinstance(node, dict):
        node.pop("title", None)
        if "default" in node and node["default"] is None:
            del node["default"]
        if node.get("type") == "object" and "properties" in node and "default" not in node:
            node["default"] = {}
        for value in node.values():
            _tidy(value)
    elif isinstance(node, list):
        for value in node:
            _tidy(value)


# ----------------------------------------------------------------------------------- documentation


def settings_table(cls: type[Settings], prefix: str = "") -> str:
    """A Markdown table of a settings class: key, default, meaning (with bounds and choices)."""
    from pathmil.settings import choices_of, describe_bounds, describe_default, settings_class_in

    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, field in cls.model_fields.items():
        nested = settings_class_in(field.annotation)
        default = "" if field.is_required() else describe_default(cls, name)
        if nested is not None:
            default = ""
        meaning = field.description or ""
        choices = choices_of(field.annotation)
        if choices:
            meaning += f" (one of {', '.join(map(str, choices))})"
        bounds = describe_bounds(field)
        if bounds:
            meaning += f" ({bounds})"
        lines.append(f"| `{prefix}{name}` | {default} | {meaning} |")
    return "\n".join(lines)


def markdown_tables() -> dict[str, str]:
    """The generated tables of config/README.md, by name (each sits between ``<!-- table NAME -->`` and
    ``<!-- end -->`` there)."""
    from pathmil.demo import DemoConfig
    from pathmil.models.mhim import MHIMConfig
    from pathmil.models.registry import list_models, model_entry
    from pathmil.settings import settings_class_in
    from pathmil.slide.tissue import TissueConfig
    from pathmil.tasks import TASKS

    run = run_config_class()
    fields = run.model_fields
    tables = {
        "demo": settings_table(DemoConfig),
        "tile": settings_table(fields["tile"].annotation),
        "tissue": settings_table(TissueConfig),
        "extract": settings_table(fields["extract"].annotation),
        "split": settings_table(fields["split"].annotation),
        "train": settings_table(fields["train"].annotation),
        "evaluate": settings_table(fields["evaluate"].annotation),
        "plots": settings_table(fields["plots"].annotation),
        "heatmap": settings_table(fields["heatmap"].annotation),
        "report": settings_table(fields["report"].annotation),
        "search": settings_table(fields["search"].annotation),
        "slurm": settings_table(fields["slurm"].annotation),
        "deploy": settings_table(settings_class_in(fields["deploy"].annotation)),
        "transfer": settings_table(settings_class_in(fields["transfer"].annotation)),
        "mhim": settings_table(MHIMConfig),
    }
    for name, cls in TASKS.items():
        tables[f"task_options.{name}"] = settings_table(cls.Options)
    seen: dict[type, list[str]] = {}
    for name in sorted(list_models(), key=lambda n: (model_entry(n).wraps is not None, n)):
        seen.setdefault(model_entry(name).settings, []).append(name)
    for cls, names in seen.items():
        tables[f"model.{names[0]}"] = (
            f"Aggregators {', '.join(f'`{n}`' for n in names)}:\n\n" + settings_table(cls)
        )
    return tables


def update_markdown(text: str, tables: dict[str, str]) -> str:
    """``text`` with every ``<!-- table NAME -->...<!-- end -->`` block replaced by its generated table."""
    import re

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in tables:
            raise PathmilError(f"config/README.md names a table '{name}' that pathmil does not generate")
        return f"<!-- table {name} -->\n{tables[name]}\n<!-- end -->"

    return re.sub(r"<!-- table (\S+) -->\n.*?<!-- end -->", replace, text, flags=re.S)
