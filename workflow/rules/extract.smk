# Stage 2 per slide: features of every tile with the frozen encoder. A slide whose tiling failed, or whose
# every tile fails to decode, is recorded as failed in its facts file; `collect` leaves it out later.


rule extract:
    input:
        tiles=f"{OUT}/tiles/{{slide}}.json",
    output:
        facts=f"{FEATURES}/{{slide}}.json",
    log:
        f"{OUT}/logs/extract/{{slide}}.log",
    group:
        "slides"
    conda:
        ENV
    threads: config["extract"]["threads"]
    resources:
        mem_mb=lambda wildcards, attempt: 8000 * attempt,
        runtime=lambda wildcards, attempt: 120 * attempt,
        gpu=config["extract"].get("gpus", 0),
    params:
        slide=lambda wildcards: shlex.quote(slide_row(wildcards.slide)["path"]),
        tiles=f"{OUT}/tiles/{{slide}}.h5",
        features=f"{FEATURES}/{{slide}}.h5",
        encoder=config["extract"]["encoder"],
        weights=(
            f"--weights {shlex.quote(config['extract']['weights'])}"
            if config["extract"].get("weights")
            else ""
        ),
        options=" ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in config["extract"].items()
            if k in ("batch_size", "workers", "precision", "dtype", "device")
        )
        + (" --random-init" if config["extract"].get("random_init") else ""),
    shell:
        "pathmil --threads {threads} extract {params.slide} --tiles {params.tiles} "
        "--encoder {params.encoder} {params.weights} --out {params.features} --facts {output.facts} "
        "--skip-errors {params.options} > {log} 2>&1"


rule collect:
    input:
        table=f"{OUT}/cohort.csv",
        facts=lambda wildcards: [f"{FEATURES}/{s}.json" for s in slide_ids()],
    output:
        table=f"{OUT}/cohort_ok.csv",
        failures=f"{OUT}/failures.csv",
    log:
        f"{OUT}/logs/collect.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 10 * attempt,
    params:
        facts_dir=FEATURES,
    shell:
        "pathmil cohort --cohort {input.table} --facts-dir {params.facts_dir} --out {output.table} "
        "--failures {output.failures} > {log} 2>&1"
