# Stage 1 per slide: tissue segmentation and the tile grid. A slide that fails is recorded in its facts
# file (status "failed") and later stages go on without it.


rule tile:
    input:
        slide_input,
    output:
        facts=f"{OUT}/tiles/{{slide}}.json",
    log:
        f"{OUT}/logs/tile/{{slide}}.log",
    group:
        "slides"
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
        runtime=lambda wildcards, attempt: 30 * attempt,
    params:
        path=lambda wildcards: shlex.quote(slide_row(wildcards.slide)["path"]),
        tiles=f"{OUT}/tiles/{{slide}}.h5",
        qc=f"{OUT}/qc/{{slide}}.png",
        mpp=slide_mpp_arg,
        settings=set_args(config["tile"]),
    shell:
        "pathmil tile {params.path} --slide-id {wildcards.slide} --out {params.tiles} --qc {params.qc} "
        "--facts {output.facts} --skip-errors {params.mpp} {params.settings} > {log} 2>&1"
