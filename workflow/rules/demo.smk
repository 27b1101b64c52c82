# The embedded demo cohort: synthetic slides whose labels are visible in the tissue.


rule demo:
    output:
        table=f"{OUT}/demo/cohort.csv",
        slides=(
            [f"{OUT}/demo/slides/{slide}.tiff" for slide in slide_ids()]
            if "demo" in config["slides"]
            else []
        ),
    log:
        f"{OUT}/logs/demo.log",
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
        runtime=lambda wildcards, attempt: 30 * attempt,
    params:
        n_slides=config["slides"].get("demo", {}).get("n_slides", 40),
        seed=config["slides"].get("demo", {}).get("seed", 0),
        size=" ".join(
            str(v) for v in config["slides"].get("demo", {}).get("size", [3072, 3584])
        ),
        out=lambda wildcards, output: os.path.dirname(output.table),
    shell:
        "pathmil demo --out {params.out} --n-slides {params.n_slides} --seed {params.seed} "
        "--size {params.size} --workers {threads} > {log} 2>&1"
