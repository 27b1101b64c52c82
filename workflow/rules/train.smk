# One run per task x aggregator x fold. MHIM-MIL runs start their teacher from the plain model of the same
# task and fold, so those runs come first.


def train_settings(task, aggregator):
    """`train` settings, then the task's own, then the aggregator's (later ones win)."""
    settings = {k: v for k, v in (config.get("train") or {}).items() if k != "gpus"}
    task_config = config["tasks"][task] or {}
    settings.update(task_config.get("train") or {})
    if task_config.get("task_options"):
        settings["task_options"] = task_config["task_options"]
    for key, value in ((config.get("models") or {}).get(aggregator) or {}).items():
        settings[key] = value
    return settings


def baseline_checkpoint(wildcards):
    base = MHIM_BASELINE.get(wildcards.aggregator)
    if base is None:
        return []
    return [f"{OUT}/models/{wildcards.task}/{base}/fold{wildcards.fold}/best.pt"]


def train_args(wildcards, input):
    args = set_args(train_settings(wildcards.task, wildcards.aggregator))
    if input.baseline:
        args += " --set " + shlex.quote(f"mhim.teacher_init={input.baseline[0]}")
    target = config["tasks"][wildcards.task].get("target")
    if target:
        args += " --target " + " ".join(shlex.quote(t) for t in target)
    return args


rule train:
    input:
        table=f"{OUT}/cohort_ok.csv",
        splits=f"{OUT}/splits/{{task}}.csv",
        baseline=baseline_checkpoint,
    output:
        metrics=f"{OUT}/models/{{task}}/{{aggregator}}/fold{{fold}}/metrics.json",
        checkpoint=f"{OUT}/models/{{task}}/{{aggregator}}/fold{{fold}}/best.pt",
        predictions=f"{OUT}/models/{{task}}/{{aggregator}}/fold{{fold}}/predictions.csv",
    params:
        run=f"{OUT}/models/{{task}}/{{aggregator}}/fold{{fold}}",
        features=FEATURES,
        settings=train_args,
    log:
        f"{OUT}/logs/train/{{task}}/{{aggregator}}/fold{{fold}}.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=(config.get("train") or {}).get("gpus", 0),
    conda:
        ENV
    shell:
        "pathmil --threads {threads} train --features {params.features} --cohort {input.table} "
        "--splits {input.splits} --fold {wildcards.fold} --task {wildcards.task} "
        "--aggregator {wildcards.aggregator} --out {params.run} --no-progress {params.settings} "
        "> {log} 2>&1"
