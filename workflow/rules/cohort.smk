# The cohort table every later rule reads: the demo's, a user's table, or the slides of a folder.


def cohort_source():
    slides = config["slides"]
    if slides.get("demo") is not None:
        return {"table": f"{OUT}/demo/cohort.csv"}
    if slides.get("table"):
        return {"table": slides["table"]}
    return {}


def cohort_source_arg(wildcards, input):
    if "table" in input.keys():
        return f"--cohort {shlex.quote(input.table)}"
    return f"--slide-dir {shlex.quote(config['slides']['dir'])}"


checkpoint cohort:
    input:
        unpack(lambda wildcards: cohort_source()),
    output:
        table=f"{OUT}/cohort.csv",
    params:
        source=cohort_source_arg,
    log:
        f"{OUT}/logs/cohort.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "pathmil cohort {params.source} --out {output.table} > {log} 2>&1"
