# Stage 1 per slide: tissue segmentation and the tile grid. A slide that fails is recorded in its facts
# file (status "failed") and later stages go on without it.


def slide_input(wildcards):
    path = slide_row(wildcards.slide)["path"]
    return [path] if os.path.exists(path) else []  # a missing file becomes a recorded failure


def slide_mpp_arg(wildcards):
    mpp = slide_row(wildcards.slide).get("mpp")
    return f"--mpp {float(mpp)}" if pd.notna(mpp) else ""


rule tile:
    input:
        slide_input,
    output:
        facts=f"{OUT}/tiles/{{slide}}.json",
    params:
        path=lambda wildcards: shlex.quote(slide_row(wildcards.slide)["path"]),
        tiles=f"{OUT}/tiles/{{slide}}.h5",
        qc=f"{OUT}/qc/{{slide}}.png",
        mpp=slide_mpp_arg,
        settings=set_args(config["tile"]),
    log:
        f"{OUT}/logs/tile/{{slide}}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    group:
        "slides"
    conda:
        ENV
    shell:
        "pathmil tile {params.path} --slide-id {wildcards.slide} --out {params.tiles} --qc {params.qc} "
        "--facts {output.facts} --skip-errors {params.mpp} {params.settings} > {log} 2>&1"
