# The cohort table every later rule reads: the demo's, a user's table, or the slides of a folder.


rule cohort:
    input:
        unpack(lambda wildcards: cohort_source()),
    output:
        table=f"{OUT}/cohort.csv",
    log:
        f"{OUT}/logs/cohort.log",
    conda:
        ENV
    params:
        source=cohort_source_args,
    shell:
        "pathmil cohort {params.source:q} --out {output.table:q} > {log:q} 2>&1"
