# Stage 2 per slide: features of every tile with the frozen encoder. A slide whose tiling failed, or whose
# every tile fails to decode, gets a bag that records the failure and a facts JSON saying why; `collect`
# leaves it out later.


rule extract:
    input:
        tiles=f"{OUT}/tiles/{{slide}}.h5",
        tiles_facts=f"{OUT}/tiles/{{slide}}.json",
        settings=extract_settings_file,
    output:
        bag=f"{FEATURES}/{{encoder}}/{{slide}}.h5",
        facts=f"{FEATURES}/{{encoder}}/{{slide}}.json",
    log:
        f"{OUT}/logs/extract/{{encoder}}/{{slide}}.log",
    group:
        slide_group
    conda:
        conda_env(config["extract"]["gpus"])
    threads: config["extract"]["threads"]
    resources:
        gpu=config["extract"]["gpus"],
        runtime=slide_runtime("extract"),
    params:
        path=slide_path,
    shell:
        "pathmil --threads {threads} extract {params.path:q} --slide-id={wildcards.slide:q} "
        "--tiles {input.tiles:q} --out {output.bag:q} --facts {output.facts:q} "
        "--config {input.settings:q} --skip-errors > {log:q} 2>&1"


rule batch:
    """One SLURM job per batch of slides: this record joins the batch's tiling and extraction jobs into one
    group (a group is what depends on one another) and lists what each slide asked for.
    """
    input:
        bags=lambda wildcards: [
            f"{FEATURES}/{e}/{s}.h5"
            for e in ENCODERS
            for s in BATCHES[int(wildcards.batch)]
        ],
    output:
        f"{OUT}/batches/{{batch}}.tsv",
    log:
        f"{OUT}/logs/batches/{{batch}}.log",
    group:
        lambda wildcards: batch_group(int(wildcards.batch))
    conda:
        ENV
    resources:
        runtime=RECORD_MINUTES,
    params:
        text=lambda wildcards: batch_record(int(wildcards.batch)),
    shell:
        "printf '%s' {params.text:q} > {output:q} 2> {log:q}"


# The slides that made it through tiling and extraction with every encoder (comparisons of encoders need the
# same patients), and the failures of the others.
rule collect:
    input:
        table=f"{OUT}/cohort.csv",
        facts=lambda wildcards: [
            f"{FEATURES}/{e}/{s}.json" for e in ENCODERS for s in slide_ids()
        ],
        bags=lambda wildcards: [
            f"{FEATURES}/{e}/{s}.h5" for e in ENCODERS for s in slide_ids()
        ],
    output:
        table=f"{OUT}/cohort_ok.csv",
        failures=f"{OUT}/failures.csv",
    log:
        f"{OUT}/logs/collect.log",
    conda:
        ENV
    params:
        facts_dirs=[f"{FEATURES}/{e}" for e in ENCODERS],
    shell:
        "pathmil cohort --cohort {input.table:q} --facts-dir {params.facts_dirs:q} "
        "--out {output.table:q} --failures {output.failures:q} > {log:q} 2>&1"
