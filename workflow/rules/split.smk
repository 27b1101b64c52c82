# Patient-level folds per task, over the slides that made it through tiling and extraction.


rule split:
    input:
        table=f"{OUT}/cohort_ok.csv",
        settings=SETTINGS_FILES["split"],
    output:
        splits=f"{OUT}/splits/{{task}}.csv",
    log:
        f"{OUT}/logs/split/{{task}}.log",
    conda:
        ENV
    params:
        target=lambda wildcards: label_columns(wildcards.task),
    shell:
        "pathmil split --cohort {input.table:q} --task {wildcards.task} --target {params.target:q} "
        "--config {input.settings:q} --out {output.splits:q} > {log:q} 2>&1"
