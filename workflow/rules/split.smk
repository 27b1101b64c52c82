# Patient-level folds per task, over the slides that made it through tiling and extraction.


rule split:
    input:
        table=f"{OUT}/cohort_ok.csv",
    output:
        splits=f"{OUT}/splits/{{task}}.csv",
    log:
        f"{OUT}/logs/split/{{task}}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 10 * attempt,
    params:
        target=lambda wildcards: " ".join(
            config["tasks"][wildcards.task].get("target") or []
        ),
        settings=set_args(config.get("split")),
    shell:
        "pathmil split --cohort {input.table} --task {wildcards.task} "
        "$([ -n '{params.target}' ] && echo --target {params.target}) {params.settings} "
        "--out {output.splits} > {log} 2>&1"
