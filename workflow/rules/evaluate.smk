# Per task x aggregator: per-fold and pooled metrics with bootstrap CIs, and the plots.


rule evaluate:
    input:
        runs=expand(
            f"{OUT}/models/{{{{task}}}}/{{{{aggregator}}}}/fold{{fold}}/metrics.json",
            fold=FOLDS,
        ),
    output:
        metrics=f"{OUT}/eval/{{task}}/{{aggregator}}/metrics.json",
        summary=f"{OUT}/eval/{{task}}/{{aggregator}}/metrics_summary.csv",
    log:
        f"{OUT}/logs/evaluate/{{task}}/{{aggregator}}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
        runtime=lambda wildcards, attempt: 30 * attempt,
    params:
        runs=lambda wildcards, input: " ".join(os.path.dirname(p) for p in input.runs),
        out=f"{OUT}/eval/{{task}}/{{aggregator}}",
        settings=set_args(config.get("evaluate")),
    shell:
        "pathmil evaluate --runs {params.runs} --out {params.out} {params.settings} > {log} 2>&1"
