# One run per task x aggregator x fold. Its settings file (task, labels, aggregator, model, loop) is an
# input, so a changed setting reruns exactly the runs it affects. MHIM-MIL runs start their teacher from the
# plain model of the same task and fold, so those runs come first.


rule train:
    input:
        table=f"{OUT}/cohort_ok.csv",
        splits=f"{OUT}/splits/{{task}}.csv",
        settings=train_settings_file,
        baseline=baseline_checkpoint,
    output:
        metrics=f"{OUT}/models/{{task}}/{{aggregator}}/fold{{fold}}/metrics.json",
        checkpoint=f"{OUT}/models/{{task}}/{{aggregator}}/fold{{fold}}/best.pt",
        predictions=f"{OUT}/models/{{task}}/{{aggregator}}/fold{{fold}}/predictions.csv",
    log:
        f"{OUT}/logs/train/{{task}}/{{aggregator}}/fold{{fold}}.log",
    conda:
        conda_env(config["train"]["gpus"])
    threads: 1
    resources:
        gpu=config["train"]["gpus"],
    params:
        run=lambda wildcards, output: os.path.dirname(output.metrics),
        features=FEATURES,
        teacher=teacher_args,
    shell:
        "pathmil --threads {threads} train --features {params.features:q} --cohort {input.table:q} "
        "--splits {input.splits:q} --fold {wildcards.fold} --config {input.settings:q} "
        "{params.teacher:q} --out {params.run:q} --no-progress > {log:q} 2>&1"
