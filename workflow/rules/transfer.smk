# Across cohorts: packages of the trained folds (`package: true`), a package applied to this cohort's
# slides (`deploy:`, an external test set when the table holds labels), and knowledge transfer into this
# cohort from source packages (`transfer:`: fine-tuning and MoE-PKT beside the baseline from scratch,
# compared with paired statistics). The deploy package's tiling and encoder were applied to the `tile` and
# `extract` settings in common.smk, so the cohort's own tiles and bags are the package's kind.

DEPLOY_OUT = f"{OUT}/deploy"
TRANSFER = config.get("transfer")


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
    return ["--cohort", input.table, "--features-dir", FEATURES]


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
        ours = (config["extract"]["encoder"], bool(config["extract"]["random_init"]))
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
        _settings = train_settings(_task, _aggregator)
        _settings["train"].update(_extra)
        SETTINGS_FILES[f"transfer/{_task}/{_strategy}"] = settings_file(
            f"transfer-{_task}-{_strategy}", _settings
        )


def transfer_targets():
    """What `deploy`, `package` and `transfer` add to `rule all`."""
    targets = []
    if config["package"]:
        targets += [
            f"{OUT}/packages/{t}/{a}.pathmil" for t in TASKS for a in AGGREGATORS
        ]
    if DEPLOY:
        targets += [f"{DEPLOY_OUT}/predictions.csv"]
        targets += [
            f"{DEPLOY_OUT}/heatmaps/{s}.png"
            for s in slide_ids()[: config["deploy"]["heatmaps"]]
        ]
        if deploy_labelled():
            targets += [f"{DEPLOY_OUT}/eval/metrics.json"]
    targets += [f"{OUT}/transfer/{t}/compare/comparison.csv" for t in TRANSFER_TASKS]
    return targets


def external_evaluations():
    """The deploy evaluation, for the summary table beside the cross-validated ones."""
    return [f"{DEPLOY_OUT}/eval/metrics.json"] if deploy_labelled() else []


rule package:
    input:
        runs=expand(
            f"{OUT}/models/{{{{task}}}}/{{{{aggregator}}}}/fold{{fold}}/metrics.json",
            fold=FOLDS,
        ),
        evaluation=f"{OUT}/eval/{{task}}/{{aggregator}}/metrics.json",
    output:
        package=directory(f"{OUT}/packages/{{task}}/{{aggregator}}.pathmil"),
    log:
        f"{OUT}/logs/package/{{task}}/{{aggregator}}.log",
    conda:
        ENV
    params:
        runs=lambda wildcards, input: [os.path.dirname(p) for p in input.runs],
        evaluation=lambda wildcards, input: os.path.dirname(input.evaluation),
        cohort=config["cohort"],
    shell:
        "pathmil package --runs {params.runs:q} --evaluation {params.evaluation:q} "
        "--cohort-name {params.cohort:q} --out {output.package:q} > {log:q} 2>&1"


rule deploy_predict:
    input:
        table=f"{OUT}/cohort_ok.csv",
        bags=lambda wildcards: [f"{FEATURES}/{s}.h5" for s in slide_ids()],
        package=(config.get("deploy") or {}).get("package", []),
    output:
        predictions=f"{DEPLOY_OUT}/predictions.csv",
    log:
        f"{OUT}/logs/deploy/predict.log",
    conda:
        ENV
    threads: 1
    params:
        bags=deploy_bags_args,
    shell:
        "pathmil --threads {threads} predict --package {input.package:q} {params.bags:q} "
        "--out {output.predictions:q} > {log:q} 2>&1"


rule deploy_evaluate:
    input:
        predictions=f"{DEPLOY_OUT}/predictions.csv",
        package=(config.get("deploy") or {}).get("package", []),
        settings=SETTINGS_FILES["evaluate"],
    output:
        metrics=f"{DEPLOY_OUT}/eval/metrics.json",
        summary=report(
            f"{DEPLOY_OUT}/eval/metrics_summary.csv",
            caption="../report/external.rst",
            category="External validation",
        ),
        plots=report(
            directory(f"{DEPLOY_OUT}/eval/plots"),
            patterns=["{name}.png"],
            caption="../report/external.rst",
            category="External validation",
            labels={"plot": "{name}"},
        ),
    log:
        f"{OUT}/logs/deploy/evaluate.log",
    conda:
        ENV
    threads: 1
    params:
        out=lambda wildcards, output: os.path.dirname(output.metrics),
    shell:
        "pathmil --threads {threads} evaluate --predictions {input.predictions:q} "
        "--package {input.package:q} --config {input.settings:q} --out {params.out:q} > {log:q} 2>&1"


rule deploy_heatmap:
    input:
        package=(config.get("deploy") or {}).get("package", []),
        bag=f"{FEATURES}/{{slide}}.h5",
        settings=SETTINGS_FILES["heatmap"],
    output:
        heatmap=report(
            f"{DEPLOY_OUT}/heatmaps/{{slide}}.png",
            caption="../report/heatmap.rst",
            category="External validation",
            labels={"slide": "{slide}", "picture": "heatmap of the package"},
        ),
    log:
        f"{OUT}/logs/deploy/heatmap/{{slide}}.log",
    conda:
        ENV
    threads: 1
    params:
        path=slide_path,
        mpp=slide_mpp_args,
    shell:
        "pathmil --threads {threads} heatmap --package {input.package:q} --features {input.bag:q} "
        "--slide {params.path:q} {params.mpp:q} --config {input.settings:q} "
        "--out {output.heatmap:q} > {log:q} 2>&1"


rule train_transfer:
    input:
        table=f"{OUT}/cohort_ok.csv",
        splits=f"{OUT}/splits/{{task}}.csv",
        settings=lambda wildcards: SETTINGS_FILES[
            f"transfer/{wildcards.task}/{wildcards.strategy}"
        ],
        sources=(TRANSFER or {}).get("sources", []),
    output:
        metrics=f"{OUT}/transfer/{{task}}/{{strategy}}/fold{{fold}}/metrics.json",
        checkpoint=f"{OUT}/transfer/{{task}}/{{strategy}}/fold{{fold}}/best.pt",
        predictions=f"{OUT}/transfer/{{task}}/{{strategy}}/fold{{fold}}/predictions.csv",
    log:
        f"{OUT}/logs/transfer/{{task}}/{{strategy}}/fold{{fold}}.log",
    wildcard_constraints:
        strategy=r"finetune\d*|moe_pkt",
    conda:
        ENV
    threads: 1
    resources:
        gpu=config["train"]["gpus"],
    params:
        run=lambda wildcards, output: os.path.dirname(output.metrics),
        features=FEATURES,
    shell:
        "pathmil --threads {threads} train --features {params.features:q} --cohort {input.table:q} "
        "--splits {input.splits:q} --fold {wildcards.fold} --config {input.settings:q} "
        "--out {params.run:q} --no-progress > {log:q} 2>&1"


rule compare_transfer:
    input:
        baseline=lambda wildcards: [
            f"{OUT}/models/{wildcards.task}/{TRANSFER['baseline']}/fold{k}/metrics.json"
            for k in FOLDS
        ],
        transfer=lambda wildcards: [
            f"{OUT}/transfer/{wildcards.task}/{s}/fold{k}/metrics.json"
            for s in TRANSFER_RUNS
            for k in FOLDS
        ],
        settings=SETTINGS_FILES["evaluate"],
    output:
        table=report(
            f"{OUT}/transfer/{{task}}/compare/comparison.csv",
            caption="../report/transfer.rst",
            category="Transfer",
            subcategory="{task}",
        ),
        verdicts=report(
            f"{OUT}/transfer/{{task}}/compare/verdicts.txt",
            caption="../report/transfer.rst",
            category="Transfer",
            subcategory="{task}",
        ),
        plots=report(
            directory(f"{OUT}/transfer/{{task}}/compare/plots"),
            patterns=["{name}.png"],
            caption="../report/transfer.rst",
            category="Transfer",
            subcategory="{task}",
            labels={"plot": "{name}"},
        ),
    log:
        f"{OUT}/logs/transfer/{{task}}/compare.log",
    conda:
        ENV
    threads: 1
    params:
        runs=lambda wildcards, input: [
            os.path.dirname(p) for p in [*input.baseline, *input.transfer]
        ],
        out=lambda wildcards, output: os.path.dirname(output.table),
    shell:
        "pathmil --threads {threads} compare --runs {params.runs:q} --out {params.out:q} "
        "--config {input.settings:q} > {log:q} 2>&1"
