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
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 10 * attempt,
    params:
        source=cohort_source_arg,
    shell:
        "pathmil cohort {params.source} --out {output.table} > {log} 2>&1"
