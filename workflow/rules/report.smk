# The report: `snakemake --report report.html` after a run gathers what is flagged with report() here.


rule summary:
    input:
        evals=[f"{eval_dir(*c)}/metrics.json" for c in configurations()],
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
    params:
        evals=lambda wildcards, input: [os.path.dirname(p) for p in input.evals],
    shell:
        "(pathmil summary --evals {params.evals:q} --out {output.summary:q} "
        "&& cp {input.failures:q} {output.failures:q}) > {log:q} 2>&1"
