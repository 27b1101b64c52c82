# Stage 1 per slide: tissue segmentation and the tile grid. A slide that fails still gets its three files:
# the facts JSON says "failed" and why, the tiles file records the failure (readers refuse it, naming the
# reason) and the QC picture shows it; later stages go on without the slide.


rule tile:
    input:
        slide=slide_input,
        settings=SETTINGS_FILES["tile"],
    output:
        tiles=f"{OUT}/tiles/{{slide}}.h5",
        facts=f"{OUT}/tiles/{{slide}}.json",
        qc=f"{OUT}/qc/{{slide}}.png",
    log:
        f"{OUT}/logs/tile/{{slide}}.log",
    group:
        slide_group
    conda:
        ENV
    threads: 1
    resources:
        runtime=slide_runtime("tile"),
    params:
        path=slide_path,
        mpp=slide_mpp_args,
    shell:
        "pathmil tile {params.path:q} --slide-id={wildcards.slide:q} --out {output.tiles:q} "
        "--qc {output.qc:q} --facts {output.facts:q} --config {input.settings:q} --skip-errors "
        "{params.mpp:q} > {log:q} 2>&1"
