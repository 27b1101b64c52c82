# Stage 1 per slide: tissue segmentation (or the slide's given outline) and the tile grid. A slide that fails
# still gets its four files: the facts JSON says "failed" and why, the tiles file records the failure
# (readers refuse it, naming the reason), the GeoJSON holds no polygon and the QC picture shows the reason;
# later stages go on without the slide.


rule tile:
    input:
        slide=slide_input,
        tissue=slide_tissue,
        settings=SETTINGS_FILES["tile"],
    output:
        tiles=f"{OUT}/tiles/{{slide}}.h5",
        facts=f"{OUT}/tiles/{{slide}}.json",
        geojson=f"{OUT}/tiles/{{slide}}.geojson",
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
        mpp=slide_table_mpp_args,
        tissue=slide_tissue_args,
    shell:
        "pathmil tile {params.path:q} --slide-id={wildcards.slide:q} --out {output.tiles:q} "
        "--qc {output.qc:q} --facts {output.facts:q} --geojson {output.geojson:q} "
        "--config {input.settings:q} --skip-errors {params.mpp:q} {params.tissue:q} > {log:q} 2>&1"
