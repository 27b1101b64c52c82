# Patient-level folds per task, over the slides that made it through tiling and extraction; stratified per
# bag (patient, or slide with slide-level labels: split_bag_level).


rule split:
    input:
        table=f"{OUT}/cohort_ok.csv",
        settings=split_settings_file,
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
