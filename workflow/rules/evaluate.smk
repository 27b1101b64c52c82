# Per task x aggregator: per-fold and pooled metrics with bootstrap CIs, the plots, and heatmaps.


rule evaluate:
    input:
        runs=expand(
            f"{OUT}/models/{{{{task}}}}/{{{{aggregator}}}}/fold{{fold}}/metrics.json",
            fold=FOLDS,
        ),
        settings=SETTINGS_FILES["evaluate"],
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
    params:
        runs=lambda wildcards, input: [os.path.dirname(p) for p in input.runs],
        out=lambda wildcards, output: os.path.dirname(output.metrics),
    shell:
        "pathmil --threads {threads} evaluate --runs {params.runs:q} --out {params.out:q} "
        "--config {input.settings:q} > {log:q} 2>&1"


rule heatmap:
    input:
        models=expand(
            f"{OUT}/models/{{{{task}}}}/{{{{aggregator}}}}/fold{{fold}}/best.pt",
            fold=FOLDS,
        ),
        splits=f"{OUT}/splits/{{task}}.csv",
        table=f"{OUT}/cohort_ok.csv",
        bag=f"{FEATURES}/{{slide}}.h5",
        settings=SETTINGS_FILES["heatmap"],
    output:
        heatmap=report(
            f"{OUT}/eval/{{task}}/{{aggregator}}/heatmaps/{{slide}}.jpg",
            caption="../report/heatmap.rst",
            category="{task}",
            subcategory="{aggregator}",
            labels={"slide": "{slide}", "picture": "heatmap"},
        ),
        montage=report(
            f"{OUT}/eval/{{task}}/{{aggregator}}/heatmaps/{{slide}}_montage.jpg",
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
    params:
        path=slide_path,
        mpp=slide_mpp_args,
    shell:
        "pathmil --threads {threads} heatmap --model {input.models:q} --splits {input.splits:q} "
        "--features {input.bag:q} --slide {params.path:q} --slide-id={wildcards.slide:q} {params.mpp:q} "
        "--config {input.settings:q} "
        "--out {output.heatmap:q} --montage {output.montage:q} > {log:q} 2>&1"
