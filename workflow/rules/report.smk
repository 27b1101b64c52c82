# The report: `snakemake --report report.html` after a run gathers what is flagged with report() here.


rule summary:
    input:
        evals=[f"{OUT}/eval/{t}/{a}/metrics.json" for t in TASKS for a in AGGREGATORS],
        failures=f"{OUT}/failures.csv",
    output:
        summary=report(
            f"{OUT}/report/summary.csv",
            caption="../report/summary.rst",
            category="Summary",
        ),
        failures=report(
            f"{OUT}/report/failures.csv",
            caption="../report/failures.rst",
            category="Summary",
        ),
    params:
        evals=lambda wildcards, input: " ".join(os.path.dirname(p) for p in input.evals),
    log:
        f"{OUT}/logs/summary.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "(pathmil summary --evals {params.evals} --out {output.summary} "
        "&& cp {input.failures} {output.failures}) > {log} 2>&1"
