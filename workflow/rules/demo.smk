# The embedded demo cohort: synthetic slides whose labels are visible in the tissue.


rule demo:
    input:
        settings=SETTINGS_FILES["demo"],
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
    params:
        out=lambda wildcards, output: os.path.dirname(output.table),
        demo=config["slides"].get("demo") or {},
    shell:
        "pathmil demo --out {params.out:q} --n-slides {params.demo[n_slides]} "
        "--seed {params.demo[seed]} --size {params.demo[size]} --workers {threads} > {log:q} 2>&1"
