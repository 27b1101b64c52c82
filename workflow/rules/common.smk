# Shared helpers: the checked config and cohort, where outputs go, and each rule's settings file.
#
# Plain Python and Snakemake only: a real cohort's workflow parses without pathmil installed (with
# `--sdm conda` the rules run in envs/pathmil.yaml); pathmil is imported at parse time only to plan the
# synthetic demo. Facts from the package (defaults, registries, each wrapper's baseline) come from the
# generated schema (workflow/schemas/config.schema.yaml, `pathmil config --schema`).
import copy
import csv
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path

import jsonschema
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

SCHEMAS = Path(workflow.basedir) / "workflow" / "schemas"
CONFIG_SCHEMA = yaml.safe_load((SCHEMAS / "config.schema.yaml").read_text())
COHORT_SCHEMA = yaml.safe_load((SCHEMAS / "cohort.schema.yaml").read_text())
FACTS = CONFIG_SCHEMA[
    "x-pathmil"
]  # each wrapper's baseline, each task's default label columns


def schema_error(error):
    """The error of the config to report, and its words. Where a value fits no branch of an anyOf (an
    optional setting, an encoder name or a list of them), jsonschema says only "is not valid under any of
    the given schemas": this names what would fit.
    """
    if error.validator not in ("anyOf", "oneOf") or not error.context:
        return error, error.message
    fitting = [e for e in error.context if e.validator != "type"]
    if not fitting:  # the value is of none of the types
        types = [t for e in error.context for t in as_list(e.validator_value)]
        return (
            error,
            f"{error.instance!r} is not of type {' or '.join(map(repr, types))}",
        )
    deepest = max(fitting, key=lambda e: len(e.relative_path))
    if deepest.relative_path:  # a list or section of the right type, wrong inside
        return schema_error(deepest)
    values, patterns = allowed_values(fitting)
    if values or patterns:
        return error, f"{error.instance!r} is not one of {values}" + "".join(
            f" nor a string matching {p!r}" for p in patterns
        )
    return schema_error(fitting[0])


def as_list(value):
    return value if isinstance(value, list) else [value]


def allowed_values(errors):
    """The enum values and string patterns that the anyOf branches of ``errors`` allow; ([], []) when a
    branch failed for another reason (a range, a key), which is then the one to report.
    """
    values, patterns = [], []
    for e in errors:
        if e.validator in ("anyOf", "oneOf") and not e.relative_path:
            inner = allowed_values([c for c in e.context if c.validator != "type"])
            if not any(inner):
                return [], []
            values, patterns = values + inner[0], patterns + inner[1]
        elif e.validator in ("enum", "const"):
            values += as_list(e.validator_value)
        elif e.validator == "pattern":
            patterns.append(e.validator_value)
        else:
            return [], []
    return values, patterns


def check_config():
    """Validate the config against the schema (defaults filled in); a problem is one line, naming the key."""
    for key in [k for k, v in config.items() if v is None]:
        del config[
            key
        ]  # `deploy:` with nothing under it (as `pathmil config --defaults` prints it): unset
    for task, entry in list((config.get("tasks") or {}).items()):
        config["tasks"][task] = (
            entry or {}
        )  # `survival:` with nothing under it takes the defaults
    try:
        validate(config, str(SCHEMAS / "config.schema.yaml"))
    except WorkflowError as err:
        if not isinstance(err.__context__, jsonschema.ValidationError):
            raise
        error, reason = schema_error(err.__context__)
        where = "".join(
            f"[{key}]" if isinstance(key, int) else f".{key}"
            for key in error.absolute_path
        )
        if where:
            reason += f" (in {where.removeprefix('.')})"
        if (
            error.validator == "additionalProperties"
        ):  # an unknown key: name the known ones
            reason += (
                f"; known keys: {', '.join(sorted(error.schema.get('properties', {})))}"
            )
        raise WorkflowError(f"config: {reason}") from None
    transferred = (config.get("transfer") or {}).get("strategies") or []
    for name, entry in (config.get("models") or {}).items():
        if name not in config["aggregators"] and name not in transferred:
            print(
                f"warning: config models.{name} is set but {name} is not in aggregators"
            )


GIVEN = copy.deepcopy(
    dict(config)
)  # the settings as written, before the schema fills in defaults
check_config()


# ------------------------------------------------------------------------------------ deploy packages

TILING_KEYS = ("target_mpp", "tile_px", "overlap", "min_tissue", "preset")


def package_manifest(path, what):
    """The manifest (package.json) of a package folder, its format checked; one line if it cannot be read."""
    manifest_path = Path(path) / "package.json"
    if not manifest_path.is_file():
        raise WorkflowError(
            f"{what} {path} is not a package (no package.json); make it first with `pathmil package` "
            "(or `package: true` in the config of its cohort)"
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != "pathmil-package":
        raise WorkflowError(f"{what} {path}: package.json is not a pathmil package's")
    if manifest.get("format_version", 0) > FACTS["package_format_version"]:
        raise WorkflowError(
            f"{what} {path} has format version {manifest['format_version']}; update pathmil"
        )
    return manifest


def resolved_tiling(tile):
    """The tiling a `tile` section makes (TileConfig.tiling): the preset's tissue parameters with overrides."""
    tissue = dict(FACTS["tissue_presets"][tile["preset"]])
    tissue.update(
        {k: v for k, v in (tile.get("tissue") or {}).items() if v is not None}
    )
    return {**{k: tile[k] for k in TILING_KEYS}, "tissue": tissue}


def apply_deploy_package():
    """A deploy cohort is tiled and encoded as its package's training bags were: the package's tiling and
    encoder replace the config's, unless the config states other values, which is refused in one line.
    """
    path = config["deploy"]["package"]
    manifest = package_manifest(path, "deploy.package")
    tiling, encoder = manifest.get("tiling"), manifest["encoder"]
    if not tiling:
        raise WorkflowError(
            f"deploy.package {path} does not know how its bags were tiled (not by pathmil); it cannot "
            "score slides"
        )
    given_tile = GIVEN.get("tile") or {}
    for key in TILING_KEYS:
        if key in given_tile and given_tile[key] != tiling[key]:
            raise WorkflowError(
                f"config tile.{key} is {given_tile[key]!r} but deploy.package {path} was trained on tiles "
                f"with {key} {tiling[key]!r}; drop tile.{key} (a deploy cohort is tiled as its package)"
            )
    if resolved_tiling(config["tile"]) != tiling:
        if (
            given_tile.get("tissue")
            and resolved_tiling(config["tile"])["tissue"] != tiling["tissue"]
        ):
            raise WorkflowError(
                f"config tile.tissue differs from the tissue parameters of deploy.package {path}; drop it"
            )
        config["tile"].update(
            {k: tiling[k] for k in TILING_KEYS}, tissue=tiling["tissue"]
        )
    given_encoder = (GIVEN.get("extract") or {}).get("encoder")
    if given_encoder is not None and given_encoder != encoder["name"]:
        raise WorkflowError(
            f"config extract.encoder is {given_encoder} but deploy.package {path} was trained on "
            f"{encoder['name']} features; drop extract.encoder"
        )
    config["extract"].update(
        encoder=encoder["name"], random_init=bool(encoder.get("random_init"))
    )
    if config["extract"]["random_init"]:
        config["extract"]["weights"] = None
    return manifest


DEPLOY = apply_deploy_package() if config.get("deploy") else None

OUT = f"results/{config['cohort']}"
# Conda environments for `--sdm conda`: rules that ask for GPUs get the CUDA build. Their post-deploy scripts
# install pathmil from this checkout, which they find through PATHMIL_SOURCE (Snakemake runs them from a copy
# under .snakemake/conda/).
ENV = "../../envs/pathmil.yaml"
ENV_CUDA = "../../envs/pathmil-cuda.yaml"
os.environ.setdefault("PATHMIL_SOURCE", str(Path(workflow.basedir).resolve()))


def conda_env(gpus):
    """The conda environment of a rule that asks for ``gpus`` GPUs."""
    return ENV_CUDA if gpus else ENV


FEATURES = (
    f"{OUT}/features"  # one folder of bags per encoder: features/{encoder}/{slide}.h5
)
SETTINGS = f"{OUT}/settings"
TASKS = [t for t in config["tasks"]] if "dir" not in config["slides"] else []
AGGREGATORS = list(config["aggregators"])
SEEDS = list(config["seeds"])
FOLDS = list(range(config["split"]["folds"]))
BASELINES = FACTS["baselines"]  # MHIM-MIL trains after the plain model of the same fold


def encoder_settings():
    """Folder name -> `extract` settings of each encoder (`extract.encoder` may list several, a grid;
    `extract.per_encoder` overrides settings of one). A randomly initialised encoder is its own folder.
    """
    extract = config["extract"]
    names = (
        extract["encoder"]
        if isinstance(extract["encoder"], list)
        else [extract["encoder"]]
    )
    base = without(extract, "threads", "gpus", "encoder", "per_encoder")
    per_encoder = extract.get("per_encoder") or {}
    entries = {}
    for name in names:
        own = per_encoder.get(name) or {}
        if len(names) > 1 and base.get("weights") and "weights" not in own:
            raise WorkflowError(
                f"config: extract.weights ({base['weights']}) would load into every encoder of "
                f"{names}; give each encoder its weights under extract.per_encoder.{name}.weights (or "
                "random_init: true there)"
            )
        settings = {**base, **own, "encoder": name}
        if settings.get("weights") and not os.path.isfile(settings["weights"]):
            raise WorkflowError(
                f"config: weights file {settings['weights']} of encoder {name} does not exist (relative "
                f"paths are relative to {os.getcwd()})"
            )
        folder = name.replace(":", "-") + (
            "-random" if settings.get("random_init") else ""
        )
        entries[folder] = settings
    return entries


def without(section, *keys):
    return {k: v for k, v in section.items() if k not in keys}


ENCODERS = encoder_settings()


wildcard_constraints:
    slide="[^/]+",
    task="|".join(TASKS) or "none",
    encoder="|".join(re.escape(e) for e in ENCODERS),
    aggregator="|".join(AGGREGATORS),
    seed=r"\d+",
    fold=r"\d+",
    batch=r"\d+",


# ------------------------------------------------------------------------------------------ slides


def demo_slides():
    """The demo's slides, known before they are painted (the demo needs pathmil at parse time)."""
    from pathmil.demo import cohort_row, plan_demo

    demo = config["slides"]["demo"]
    plan = plan_demo(demo["n_slides"], demo.get("n_patients"), demo["seed"])
    return [cohort_row(s, f"{OUT}/demo/slides/{s.slide_id}.tiff") for s in plan]


def read_cohort_table(path):
    """The rows of a cohort table (CSV, or TSV by extension): text stripped, numbers as numbers, empty as
    None, relative slide paths resolved against the table's folder. One line for what cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise WorkflowError(
            f"cohort table {path} does not exist (slides.table in the config)"
        )
    text = path.read_text(errors="replace")
    if not text.strip():
        raise WorkflowError(
            f"cohort table {path} is empty; it needs a header and one row per slide"
        )
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    columns = [c.strip() for c in reader.fieldnames or []]
    if len(columns) == 1 and ";" in columns[0]:
        raise WorkflowError(
            f"cohort table {path} has one column '{columns[0]}': it looks ';'-separated; save it with commas"
        )
    rows = []
    for raw in reader:
        row = {k.strip(): _value(k.strip(), v) for k, v in raw.items() if k is not None}
        for column in ("path", "tissue"):  # files named relative to the table's folder
            if row.get(column):
                p = Path(str(row[column])).expanduser()
                row[column] = str(p if p.is_absolute() else (path.parent / p).resolve())
        rows.append(row)
    if not rows:
        raise WorkflowError(
            f"cohort table {path} has no rows (only a header); add one row per slide"
        )
    return columns, rows


# the cells pandas reads as missing (pathmil's CLI reads tables with pandas): the same cells are empty here
MISSING = set(
    "#N/A,#N/A N/A,#NA,-1.#IND,-1.#QNAN,-NaN,-nan,1.#IND,1.#QNAN,<NA>,N/A,NA,NULL,NaN,None,n/a,nan,null".split(
        ","
    )
) | {""}


def _value(column, text):
    text = (text or "").strip()
    if column in ("slide_id", "patient_id", "path"):
        return text or None
    if text in MISSING:
        return None
    try:
        number = float(text)
    except ValueError:
        return text
    if not math.isfinite(number):
        return None if math.isnan(number) else number
    return int(number) if number.is_integer() else number


def check_cohort_table(path, columns, rows):
    """The table's columns and values, checked before any job: the schema per row (ids, numbers, ranges)
    and what spans rows (unique slides and files, one label per patient)."""
    targets = {t: label_columns(t) for t in TASKS}
    required = COHORT_SCHEMA["required"] + [
        c for cols in targets.values() for c in cols
    ]
    missing = [c for c in dict.fromkeys(required) if c not in columns]
    if missing:
        raise WorkflowError(
            f"cohort table {path} lacks column(s) {', '.join(missing)}; it has {', '.join(columns)}"
        )
    validator = jsonschema.Draft202012Validator(COHORT_SCHEMA)
    own_name = {  # a task's own label columns are checked as its default ones; messages name the own
        default: own
        for task, cols in targets.items()
        for own, default in zip(cols, FACTS["default_targets"][task])
    }
    for number, row in enumerate(rows, start=2):
        for column in dict.fromkeys(required):
            if row.get(column) is None:
                raise WorkflowError(
                    f"cohort table {path}, line {number}: slide {row.get('slide_id')} has no value in column "
                    f"'{column}'; fill it in or drop the slide"
                )
        renamed = dict(row)
        for default, own in own_name.items():
            renamed[default] = row.get(own)
        error = jsonschema.exceptions.best_match(validator.iter_errors(renamed))
        if error is not None:
            field = ".".join(map(str, error.absolute_path)) or "row"
            if error.validator == "pattern":
                raise WorkflowError(
                    f"cohort table {path}, line {number}: {field} {error.instance!r} is not allowed: "
                    f"{error.schema.get('description', error.message)}"
                )
            must = (
                COHORT_SCHEMA["properties"].get(field, {}).get("x-must")
                or error.message
            )
            raise WorkflowError(
                f"cohort table {path}, line {number}: slide {row.get('slide_id')}: {own_name.get(field, field)} "
                f"is {error.instance!r}; it must be {must}"
            )
    for number, row in enumerate(rows, start=2):
        if row.get("tissue") and not os.path.isfile(row["tissue"]):
            raise WorkflowError(
                f"cohort table {path}, line {number} (slide {row['slide_id']}): tissue file {row['tissue']} "
                "does not exist; fix the 'tissue' column or leave it empty for the automatic mask"
            )
    check_unique_ids(path, rows)
    check_unique_files(path, rows)
    check_value_ranges(path, rows, targets)
    for task, cols in targets.items():
        if split_bag_level(task) == "patient":
            check_patient_labels(path, rows, cols)


def check_folds(rows):
    """split.folds against the patients: each fold's test part needs a patient, for classification one of
    each class, and for survival one with an event. `pathmil split` refuses the same in the same words (check_folds in pathmil/data/splits.py).
    """
    folds = config["split"]["folds"]

    def refuse(who, n):
        fix = (
            f"use at most {n} folds"
            if n >= 2
            else "cross-validation needs at least 2 of them"
        )
        raise WorkflowError(
            f"split.folds is {folds} but {who}; each fold needs one in its test part: {fix}"
        )

    n = len({row["patient_id"] for row in rows})
    limits = [(n, f"the cohort has only {n} patient{'s' * (n != 1)}")]
    if "classification" in TASKS:
        column = label_columns("classification")[0]
        patients = {}  # class -> its patients
        for row in rows:
            if row.get(column) is not None:
                patients.setdefault(row[column], set()).add(row["patient_id"])
        numeric = all(isinstance(c, (int, float)) for c in patients)
        for value in sorted(
            patients, key=None if numeric else str
        ):  # as pathmil's class order
            k = len(patients[value])
            have = f"{k} patients have" if k != 1 else "1 patient has"
            limits.append((k, f"only {have} class {value!r} in column '{column}'"))
    if "survival" in TASKS:  # a test part without an event has no c-index
        column = label_columns("survival")[1]
        k = len({row["patient_id"] for row in rows if row.get(column) == 1})
        have = f"{k} patients have" if k != 1 else "1 patient has"
        limits.append((k, f"only {have} an event (column '{column}' is 1)"))
    k, who = min(limits, key=lambda limit: limit[0])  # the tightest: its advice works
    if k < folds:
        refuse(who, k)


def check_unique_ids(path, rows):
    """In the words of pathmil.cohort.check_slide_ids, which `pathmil` commands use."""
    seen = set()
    for row in rows:
        if row["slide_id"] in seen:
            raise WorkflowError(
                f"cohort table {path}: slide id {row['slide_id']} appears twice; every slide needs a "
                "unique id (rename one)"
            )
        seen.add(row["slide_id"])


def check_unique_files(path, rows):
    """In the words of pathmil.cohort.check_unique_files, which `pathmil` commands use."""
    seen = {}
    for row in rows:
        file = row.get("path")
        if file is not None and file in seen:
            raise WorkflowError(
                f"cohort table {path}: path {file} appears twice (slides {seen[file]} and "
                f"{row['slide_id']}); the same slide file under two slide ids would land in train and test"
            )
        seen[file] = row["slide_id"]


def check_value_ranges(path, rows, targets):
    """Regression labels within the task's value_range; a 0-1 column given for a 0-100 range is flagged."""
    if "regression" not in targets:
        return
    low, high = config["tasks"]["regression"]["task_options"].get("value_range") or (
        None,
        None,
    )
    column = targets["regression"][0]
    values = [row[column] for row in rows if isinstance(row.get(column), (int, float))]
    if low is None or not values:
        return
    outside = [v for v in values if not low <= v <= high]
    if outside:
        raise WorkflowError(
            f"cohort table {path}: column '{column}' has {len(outside)} value(s) outside [{low:g}, {high:g}] "
            f"(first: {outside[0]}); fix them or set tasks.regression.task_options.value_range"
        )
    if high >= 50 and max(values) <= 1 and len(values) > 1:
        raise WorkflowError(
            f"cohort table {path}: column '{column}' lies within [0, 1] but the range is [{low:g}, {high:g}]: "
            "percentages given as fractions? multiply them by 100 (or set task_options.value_range)"
        )


def check_patient_labels(path, rows, label_columns):
    """A patient's slides share the patient's labels when bags are patients (bag_level: patient)."""
    labels = {}
    for row in rows:
        key = tuple(row.get(c) for c in label_columns)
        first = labels.setdefault(row.get("patient_id"), (row["slide_id"], key))
        if first[1] != key:
            raise WorkflowError(
                f"cohort table {path}: patient {row.get('patient_id')} has conflicting labels (slide "
                f"{first[0]}: {first[1]}, slide {row['slide_id']}: {key}); give all slides of a patient "
                "the same labels, or set train.bag_level: slide for slide-level labels"
            )


def label_columns(task):
    return list(
        (config["tasks"][task] or {}).get("target") or FACTS["default_targets"][task]
    )


def without(section, *keys):
    return {k: v for k, v in section.items() if k not in keys}


def train_settings(task, aggregator, seed=0):
    """The `train` section of one task x aggregator x seed's runs: train, then the task's, then the
    aggregator's."""
    entry = config["tasks"][task] or {}
    model = dict((config["models"].get(aggregator) or {}))
    settings = {**without(config["train"], "gpus"), **(entry.get("train") or {})}
    settings.update(without(model, "model", "mhim"))
    settings.update(
        task=task,
        seed=seed,
        target=label_columns(task),
        task_options=entry.get("task_options") or {},
        aggregator=aggregator,
        model=model.get("model") or {},
    )
    if "mhim" in model:
        settings["mhim"] = model["mhim"]
    return {"train": settings}


def check_cox_steps():
    """Refuse, before any slide is tiled, what pathmil.training.run.TrainConfig refuses at a train job:
    the Cox loss ranks the bags of one optimiser step against each other, so one bag per step trains
    nothing."""
    for task in TASKS:
        for aggregator in AGGREGATORS:
            train = train_settings(task, aggregator)["train"]
            steps = train.get("accumulation") or 1
            if train["task_options"].get("loss") == "cox" and steps < 2:
                raise WorkflowError(
                    f"config: tasks.{task}.task_options.loss cox compares the bags of one optimiser step, "
                    f"and train.accumulation {steps} gives each step one bag (aggregator "
                    f"{aggregator}): nothing would train; set train.accumulation to 16 or more"
                )


def split_bag_level(task):
    """The bag level the task's splits are made for: patient when any of its runs joins a patient's slides
    (their labels must then agree), else slide (slide-level labels, stratified per slide).
    """
    levels = {train_settings(task, a)["train"]["bag_level"] for a in AGGREGATORS}
    return "patient" if "patient" in levels else "slide"


def slides_of_dir(directory):
    """Slide files of a folder, ids from file names; a sub-folder of .dcm files is one DICOM slide, and the
    loose .dcm files of the folder are one slide (OpenSlide reads a series from any of its files).
    """
    extensions = CONFIG_SCHEMA["x-pathmil"].get("slide_extensions") or []
    directory = Path(directory)
    if not directory.is_dir():
        raise WorkflowError(
            f"slide directory {directory} does not exist (slides.dir in the config)"
        )
    rows, loose_dicom = [], []
    for entry in sorted(directory.iterdir()):
        name = entry.name.lower()
        if entry.is_dir() and any(entry.glob("*.dcm")):
            rows.append(
                {
                    "slide_id": entry.name,
                    "path": str(sorted(entry.glob("*.dcm"))[0].resolve()),
                }
            )
        elif name.endswith(".dcm"):
            loose_dicom.append(entry)
        elif name.endswith(tuple(extensions)) and not name.startswith("."):
            stem = next(entry.name[: -len(e)] for e in extensions if name.endswith(e))
            rows.append({"slide_id": stem, "path": str(entry.resolve())})
    if loose_dicom:
        rows.append(
            {"slide_id": loose_dicom[0].stem, "path": str(loose_dicom[0].resolve())}
        )
    if not rows:
        raise WorkflowError(
            f"slide directory {directory} holds no slide files ({', '.join(extensions)})"
        )
    return rows


def parse_slides():
    """slide_id, path and mpp of every slide, known when the workflow is parsed (so a dry run lists every
    job): the demo's plan, the user's table (checked), or the files of a slide folder.
    """
    slides = config["slides"]
    if "demo" in slides:
        rows = demo_slides()
    elif "table" in slides:
        columns, rows = read_cohort_table(slides["table"])
        check_cohort_table(slides["table"], columns, rows)
        warn_missing_files(rows)
    else:
        rows = slides_of_dir(slides["dir"])
    if TASKS:
        check_folds(rows)
    pattern = re.compile(COHORT_SCHEMA["properties"]["slide_id"]["pattern"])
    for row in rows:
        if not pattern.fullmatch(str(row["slide_id"])):
            raise WorkflowError(
                f"slide id {row['slide_id']!r} is not allowed: {COHORT_SCHEMA['properties']['slide_id']['description']}"
            )
    return {row["slide_id"]: row for row in rows}


def warn_missing_files(rows):
    """A table's slide files that do not exist: not an error (their tile jobs record the failure in
    failures.csv and the other slides go on), but said before any job, where a wrong folder shows at once.
    """
    missing = [row for row in rows if not os.path.exists(row["path"])]
    if missing:
        first = missing[0]
        print(
            f"warning: {len(missing)} of {len(rows)} slide files in the cohort table do not exist (first: "
            f"slide {first['slide_id']}, {first['path']}); their tile jobs will record the failure in "
            "failures.csv and the other slides go on",
            file=sys.stderr,
        )


SLIDES = parse_slides()


def slide_ids():
    return list(SLIDES)


def heatmap_slides():
    """The first slides of the cohort (as many as `report.heatmaps`) get heatmaps in the report."""
    return slide_ids()[: config["report"]["heatmaps"]]


# ---------------------------------------------------------------------------------------- settings


SETTINGS_TEXT = {}  # settings file -> its content


def settings_file(name, sections):
    """The file holding a rule's settings, named by a digest of its content (written by rule `settings`).

    The file is an input of the rule's jobs: changed settings are a new file, which reruns exactly the
    jobs that read it; settings changed back are the old file again, which reruns nothing. Nothing is
    written when the workflow parses."""
    text = yaml.safe_dump(sections, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = f"{SETTINGS}/{name}.{digest}.yaml"
    SETTINGS_TEXT[path] = text
    return path


SETTINGS_FILES = {
    "demo": settings_file(
        "demo", {"slides": {"demo": config["slides"].get("demo") or {}}}
    ),
    "tile": settings_file("tile", {"tile": config["tile"]}),
    "evaluate": settings_file(
        "evaluate", {"evaluate": config["evaluate"], "plots": config["plots"]}
    ),
    "heatmap": settings_file("heatmap", {"heatmap": config["heatmap"]}),
    "search": settings_file("search", {"search": config["search"]}),
}
SEARCH = (
    config["search"]["n_trials"] > 0
)  # a hyperparameter search inside each fold before its training
check_cox_steps()
for _encoder, _settings in ENCODERS.items():
    SETTINGS_FILES[f"extract/{_encoder}"] = settings_file(
        f"extract-{_encoder}", {"extract": _settings}
    )
for _task in TASKS:
    SETTINGS_FILES[f"split/{_task}"] = settings_file(
        f"split-{_task}",
        {
            "split": {
                **config["split"],
                "bag_level": split_bag_level(_task),
                "task_options": (config["tasks"][_task] or {}).get("task_options")
                or {},
            }
        },
    )
    for _aggregator in AGGREGATORS:
        for _seed in SEEDS:
            SETTINGS_FILES[f"train/{_task}/{_aggregator}/{_seed}"] = settings_file(
                f"train-{_task}-{_aggregator}-seed{_seed}",
                train_settings(_task, _aggregator, _seed),
            )


def extract_settings_file(wildcards):
    return SETTINGS_FILES[f"extract/{wildcards.encoder}"]


def train_settings_file(wildcards):
    w = wildcards
    return SETTINGS_FILES[f"train/{w.task}/{w.aggregator}/{w.seed}"]


def search_dir(task, encoder, aggregator, seed, fold):
    return f"{OUT}/search/{task}/{encoder}/{aggregator}/seed{seed}/fold{fold}"


def searched_settings(wildcards):
    """The best settings the fold's search found, when the config asks for a search."""
    w = wildcards
    if not SEARCH:
        return []
    return [f"{search_dir(w.task, w.encoder, w.aggregator, w.seed, w.fold)}/best.yaml"]


def run_dir(task, encoder, aggregator, seed, fold):
    return f"{OUT}/models/{task}/{encoder}/{aggregator}/seed{seed}/fold{fold}"


def eval_dir(task, encoder, aggregator, seed):
    return f"{OUT}/eval/{task}/{encoder}/{aggregator}/seed{seed}"


def configurations():
    """Every (task, encoder, aggregator, seed) of the grid."""
    return [
        (t, e, a, s)
        for t in TASKS
        for e in ENCODERS
        for a in AGGREGATORS
        for s in SEEDS
    ]


def split_settings_file(wildcards):
    return SETTINGS_FILES[f"split/{wildcards.task}"]


# ------------------------------------------------------------------------------------------- inputs


def all_targets(wildcards):
    """Every slide's files and the cohort of those that made it; with tasks, the evaluation of every
    configuration (task x encoder x aggregator x seed), each task's comparison, heatmaps and the report.
    The per-slide files are named here so that a deleted one is made again with everything that depends
    on it (Snakemake remakes a missing intermediate file only when asked for it).
    """
    per_slide = [
        f"{OUT}/tiles/{{s}}.h5",
        f"{OUT}/tiles/{{s}}.geojson",
        f"{OUT}/qc/{{s}}.png",
    ]
    per_slide += [f"{FEATURES}/{e}/{{s}}.h5" for e in ENCODERS]
    targets = [
        pattern.format(s=slide) for slide in slide_ids() for pattern in per_slide
    ]
    targets += [f"{OUT}/batches/{index}.tsv" for index in range(len(BATCHES))]
    targets += [f"{OUT}/cohort_ok.csv", f"{OUT}/report/qc_gallery.html"]
    if TASKS:
        targets += [f"{eval_dir(*c)}/metrics.json" for c in configurations()]
        targets += [f"{OUT}/eval/{t}/comparison/comparison.json" for t in TASKS]
        targets += [f"{OUT}/report/summary.html"]
        targets += [
            f"{OUT}/eval/{t}/{e}/{a}/heatmaps/{s}.jpg"
            for t in TASKS
            for e in ENCODERS
            for a in AGGREGATORS
            for s in heatmap_slides()
        ]
    return targets + transfer_targets()


def cohort_source():
    slides = config["slides"]
    if "demo" in slides:
        return {"table": f"{OUT}/demo/cohort.csv"}
    if "table" in slides:
        return {"table": slides["table"]}
    return {}


def cohort_source_args(wildcards, input):
    if "table" in input.keys():
        return ["--cohort", input.table]
    return ["--slide-dir", config["slides"]["dir"]]


def slide_input(wildcards):
    """The slide file; a missing one is no input but a recorded failure of that slide."""
    path = SLIDES[wildcards.slide]["path"]
    return [path] if "demo" in config["slides"] or os.path.exists(path) else []


def slide_path(wildcards):
    return SLIDES[wildcards.slide]["path"]


def slide_mpp_args(wildcards):
    """The table's mpp of the slide as --mpp (heatmaps: um/px where the metadata has none)."""
    mpp = SLIDES[wildcards.slide].get("mpp")
    return ["--mpp", str(float(mpp))] if mpp not in (None, "") else []


def slide_table_mpp_args(wildcards):
    """The table's mpp of the slide as --table-mpp, so the tiles' facts say it came from the table."""
    mpp = SLIDES[wildcards.slide].get("mpp")
    return ["--table-mpp", str(float(mpp))] if mpp not in (None, "") else []


def slide_tissue(wildcards):
    """The slide's given tissue outline (GeoJSON): the table's `tissue` column, else tile.tissue_dir's
    SLIDE.geojson when it exists. An input of the slide's tile job: editing it reruns that slide's chain.
    """
    given = SLIDES[wildcards.slide].get("tissue")
    if not given and config["tile"].get("tissue_dir"):
        candidate = os.path.join(
            config["tile"]["tissue_dir"], f"{wildcards.slide}.geojson"
        )
        given = candidate if os.path.isfile(candidate) else None
    return [given] if given else []


def slide_tissue_args(wildcards, input):
    return ["--tissue-geojson", input.tissue[0]] if input.tissue else []


def baseline_checkpoint(wildcards):
    w = wildcards
    base = BASELINES.get(w.aggregator)
    if base is None:
        return []
    return [f"{run_dir(w.task, w.encoder, base, w.seed, w.fold)}/best.pt"]


def teacher_args(wildcards, input):
    return ["--teacher-init", input.baseline[0]] if input.baseline else []


# ------------------------------------------------------------------- across cohorts (transfer.smk)

DEPLOY_OUT = f"{OUT}/deploy"
TRANSFER = config.get("transfer")
if (DEPLOY or TRANSFER) and len(ENCODERS) > 1:
    raise WorkflowError(
        f"config: deploy and transfer take one encoder, extract.encoder lists {len(ENCODERS)}; run the "
        "encoder grid without them"
    )
# the bags deploy and transfer read: the one encoder's folder
ONE_FEATURES = f"{FEATURES}/{next(iter(ENCODERS))}"


def deploy_labelled():
    """Whether every slide has the deploy package's label columns (then it is an external test set)."""
    if not DEPLOY:
        return False
    columns = DEPLOY["task"]["label_columns"]
    if "demo" in config["slides"]:
        return set(columns) <= {"label", "time", "event", "stil"}
    if "table" in config["slides"]:
        return all(row.get(c) is not None for row in SLIDES.values() for c in columns)
    return False


def deploy_bags_args(wildcards, input):
    """A table's (or the demo's) bags by patient, with their labels; a slide folder's bags one by one."""
    if "dir" in config["slides"]:
        return ["--features", *input.bags]
    return ["--cohort", input.table, "--features-dir", ONE_FEATURES]


def transfer_runs():
    """Strategy name -> the train settings it adds: `finetune` (or finetune0, finetune1, ... with several
    sources) starts the baseline from a source; `moe_pkt` mixes all sources."""
    if not TRANSFER:
        return {}
    sources = list(TRANSFER["sources"])
    runs = {}
    if "finetune" in TRANSFER["strategies"]:
        for i, source in enumerate(sources):
            name = "finetune" if len(sources) == 1 else f"finetune{i}"
            runs[name] = {"init_from": source}
    if "moe_pkt" in TRANSFER["strategies"]:
        runs["moe_pkt"] = {"sources": sources}
    return runs


def check_transfer():
    """Sources that are packages of this cohort's encoder, a baseline that is trained here."""
    if TRANSFER["baseline"] not in AGGREGATORS:
        raise WorkflowError(
            f"transfer.baseline {TRANSFER['baseline']} is not in aggregators {AGGREGATORS}; add it (it is "
            "the model trained from scratch and fine-tuned)"
        )
    if TRANSFER["baseline"] in BASELINES or TRANSFER["baseline"] == "moe_pkt":
        raise WorkflowError(
            f"transfer.baseline {TRANSFER['baseline']} cannot be fine-tuned from a source (a wrapper or "
            "MoE-PKT itself); name a plain aggregator, e.g. abmil"
        )
    for source in TRANSFER["sources"]:
        encoder = package_manifest(source, "transfer.sources")["encoder"]
        ours = next(
            (e["encoder"], bool(e.get("random_init"))) for e in ENCODERS.values()
        )
        if (encoder["name"], bool(encoder.get("random_init"))) != ours:
            raise WorkflowError(
                f"transfer.sources {source} was trained on {encoder['name']} features, this cohort is "
                f"encoded with {ours[0]}; transfer needs the same encoder"
            )


TRANSFER_TASKS = []
if TRANSFER:
    check_transfer()
    TRANSFER_TASKS = [t for t in (TRANSFER.get("tasks") or TASKS) if t in TASKS]
TRANSFER_RUNS = transfer_runs()
for _task in TRANSFER_TASKS:
    for _strategy, _extra in TRANSFER_RUNS.items():
        _aggregator = "moe_pkt" if _strategy == "moe_pkt" else TRANSFER["baseline"]
        _settings = train_settings(_task, _aggregator, SEEDS[0])
        _settings["train"].update(_extra)
        SETTINGS_FILES[f"transfer/{_task}/{_strategy}"] = settings_file(
            f"transfer-{_task}-{_strategy}", _settings
        )


def transfer_targets():
    """What `deploy`, `package` and `transfer` add to `rule all`."""
    targets = []
    if config["package"]:
        targets += [
            f"{OUT}/packages/{t}/{e}/{a}.pathmil"
            for t in TASKS
            for e in ENCODERS
            for a in AGGREGATORS
        ]
    if DEPLOY:
        targets += [f"{DEPLOY_OUT}/predictions.csv"]
        targets += [
            f"{DEPLOY_OUT}/heatmaps/{s}.jpg"
            for s in slide_ids()[: config["deploy"]["heatmaps"]]
        ]
        if deploy_labelled():
            targets += [f"{DEPLOY_OUT}/eval/metrics.json"]
    targets += [f"{OUT}/transfer/{t}/compare/comparison.csv" for t in TRANSFER_TASKS]
    return targets


def external_evaluations():
    """The deploy evaluation, for the summary table beside the cross-validated ones."""
    return [f"{DEPLOY_OUT}/eval/metrics.json"] if deploy_labelled() else []
