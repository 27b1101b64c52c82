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
        plots=report(
            directory(f"{OUT}/eval/{{task}}/{{aggregator}}/plots"),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category="{task}",
            subcategory="{aggregator}",
            labels={"plot": "{name}", "model": "{aggregator}"},
        ),
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
        out=lambda wildcards, output: os.path.dirname(output.metrics),
        settings=set_args(config.get("evaluate")),
    shell:
        "pathmil --threads {threads} evaluate --runs {params.runs} --out {params.out} "
        "{params.settings} > {log} 2>&1"


rule heatmap:
    input:
        models=expand(
            f"{OUT}/models/{{{{task}}}}/{{{{aggregator}}}}/fold{{fold}}/best.pt",
            fold=FOLDS,
        ),
        splits=f"{OUT}/splits/{{task}}.csv",
        table=f"{OUT}/cohort_ok.csv",
    output:
        heatmap=report(
            f"{OUT}/eval/{{task}}/{{aggregator}}/heatmaps/{{slide}}.png",
            caption="../report/heatmap.rst",
            category="{task}",
            subcategory="{aggregator}",
            labels={"slide": "{slide}", "picture": "heatmap"},
        ),
        montage=report(
            f"{OUT}/eval/{{task}}/{{aggregator}}/heatmaps/{{slide}}_montage.png",
            caption="../report/montage.rst",
            category="{task}",
            subcategory="{aggregator}",
            labels={"slide": "{slide}", "picture": "top and bottom tiles"},
        ),
    log:
        f"{OUT}/logs/heatmap/{{task}}/{{aggregator}}/{{slide}}.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=lambda wildcards, attempt: 4000 * attempt,
        runtime=lambda wildcards, attempt: 20 * attempt,
    params:
        slide=lambda wildcards: shlex.quote(slide_row(wildcards.slide)["path"]),
        features=f"{FEATURES}/{{slide}}.h5",
        mpp=slide_mpp_arg,
    shell:
        "pathmil --threads {threads} heatmap --model {input.models} --splits {input.splits} "
        "--features {params.features} --slide {params.slide} {params.mpp} --out {output.heatmap} "
        "--montage {output.montage} > {log} 2>&1"
