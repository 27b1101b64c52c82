# One run per task x aggregator x fold. MHIM-MIL runs start their teacher from the plain model of the same
# task and fold, so those runs come first.


rule train:
    input:
        table=f"{OUT}/cohort_ok.csv",
        splits=f"{OUT}/splits/{{task}}.csv",
        baseline=baseline_checkpoint,
    output:
        metrics=f"{OUT}/models/{{task}}/{{aggregator}}/fold{{fold}}/metrics.json",
        checkpoint=f"{OUT}/models/{{task}}/{{aggregator}}/fold{{fold}}/best.pt",
        predictions=f"{OUT}/models/{{task}}/{{aggregator}}/fold{{fold}}/predictions.csv",
    log:
        f"{OUT}/logs/train/{{task}}/{{aggregator}}/fold{{fold}}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 8000 * attempt,
        runtime=lambda wildcards, attempt: 240 * attempt,
        gpu=(config.get("train") or {}).get("gpus", 0),
    params:
        run=f"{OUT}/models/{{task}}/{{aggregator}}/fold{{fold}}",
        features=FEATURES,
        settings=train_args,
    shell:
        "pathmil --threads {threads} train --features {params.features} --cohort {input.table} "
        "--splits {input.splits} --fold {wildcards.fold} --task {wildcards.task} "
        "--aggregator {wildcards.aggregator} --out {params.run} --no-progress {params.settings} "
        "> {log} 2>&1"
