# One run per task x encoder x aggregator x seed x fold. Its settings file (task, labels, aggregator,
# model, loop, seed) is an input, so a changed setting reruns exactly the runs it affects. MHIM-MIL runs
# start their teacher from the plain model of the same task, encoder, seed and fold, so those come first.


RUN = run_dir("{task}", "{encoder}", "{aggregator}", "{seed}", "{fold}")


rule train:
    input:
        table=f"{OUT}/cohort_ok.csv",
        splits=f"{OUT}/splits/{{task}}.csv",
        settings=train_settings_file,
        baseline=baseline_checkpoint,
    output:
        metrics=f"{RUN}/metrics.json",
        checkpoint=f"{RUN}/best.pt",
        predictions=f"{RUN}/predictions.csv",
    log:
        f"{OUT}/logs/train/{{task}}/{{encoder}}/{{aggregator}}/seed{{seed}}/fold{{fold}}.log",
    conda:
        ENV
    threads: 1
    resources:
        gpu=config["train"]["gpus"],
    params:
        run=lambda wildcards, output: os.path.dirname(output.metrics),
        features=f"{FEATURES}/{{encoder}}",
        teacher=teacher_args,
    shell:
        "pathmil --threads {threads} train --features {params.features:q} --cohort {input.table:q} "
        "--splits {input.splits:q} --fold {wildcards.fold} --config {input.settings:q} "
        "{params.teacher:q} --out {params.run:q} --no-progress > {log:q} 2>&1"
