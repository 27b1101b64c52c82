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
    log:
        f"{OUT}/logs/summary.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 2000 * attempt,
        runtime=lambda wildcards, attempt: 10 * attempt,
    params:
        evals=lambda wildcards, input: " ".join(os.path.dirname(p) for p in input.evals),
    shell:
        "(pathmil summary --evals {params.evals} --out {output.summary} "
        "&& cp {input.failures} {output.failures}) > {log} 2>&1"
