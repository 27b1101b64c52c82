# Per configuration (task x encoder x aggregator x seed): per-fold and pooled metrics with bootstrap CIs and
# the plots; per task: the paired comparison of every configuration; heatmaps of the first seed's models.

CONFIG = "{task}/{encoder}/{aggregator}"


rule evaluate:
    input:
        runs=lambda wildcards: [
            f"{run_dir(wildcards.task, wildcards.encoder, wildcards.aggregator, wildcards.seed, k)}/metrics.json"
            for k in FOLDS
        ],
        settings=SETTINGS_FILES["evaluate"],
    output:
        metrics=f"{OUT}/eval/{CONFIG}/seed{{seed}}/metrics.json",
        summary=f"{OUT}/eval/{CONFIG}/seed{{seed}}/metrics_summary.csv",
        plots=report(
            directory(f"{OUT}/eval/{CONFIG}/seed{{seed}}/plots"),
            patterns=["{name}.png"],
            caption="../report/plots.rst",
            category="{task}",
            subcategory="{encoder} {aggregator} seed {seed}",
            labels={"plot": "{name}", "model": "{aggregator}", "encoder": "{encoder}"},
        ),
    log:
        f"{OUT}/logs/evaluate/{CONFIG}/seed{{seed}}.log",
    conda:
        ENV
    threads: 1
    params:
        runs=lambda wildcards, input: [os.path.dirname(p) for p in input.runs],
        out=lambda wildcards, output: os.path.dirname(output.metrics),
    shell:
        "pathmil --threads {threads} evaluate --runs {params.runs:q} --out {params.out:q} "
        "--config {input.settings:q} > {log:q} 2>&1"


rule compare:
    input:
        runs=lambda wildcards: [
            f"{run_dir(wildcards.task, e, a, s, k)}/metrics.json"
            for e in ENCODERS
            for a in AGGREGATORS
            for s in SEEDS
            for k in FOLDS
        ],
        settings=SETTINGS_FILES["evaluate"],
    output:
        comparison=f"{OUT}/eval/{{task}}/comparison/comparison.json",
        table=f"{OUT}/eval/{{task}}/comparison/comparison.csv",
        page=report(
            f"{OUT}/eval/{{task}}/comparison/comparison.html",
            caption="../report/comparison.rst",
            category="{task}",
            subcategory="comparison",
            labels={"page": "configurations, paired differences, verdicts"},
        ),
        plots=report(
            directory(f"{OUT}/eval/{{task}}/comparison/plots"),
            patterns=["{name}.png"],
            caption="../report/comparison.rst",
            category="{task}",
            subcategory="comparison",
            labels={"plot": "{name}"},
        ),
    log:
        f"{OUT}/logs/compare/{{task}}.log",
    conda:
        ENV
    threads: 1
    params:
        runs=lambda wildcards, input: [os.path.dirname(p) for p in input.runs],
        out=lambda wildcards, output: os.path.dirname(output.comparison),
    shell:
        "pathmil --threads {threads} compare --runs {params.runs:q} --out {params.out:q} "
        "--config {input.settings:q} > {log:q} 2>&1"


rule heatmap:
    input:
        models=lambda wildcards: [
            f"{run_dir(wildcards.task, wildcards.encoder, wildcards.aggregator, SEEDS[0], k)}/best.pt"
            for k in FOLDS
        ],
        splits=f"{OUT}/splits/{{task}}.csv",
        table=f"{OUT}/cohort_ok.csv",
        bag=f"{FEATURES}/{{encoder}}/{{slide}}.h5",
        settings=SETTINGS_FILES["heatmap"],
    output:
        heatmap=report(
            f"{OUT}/eval/{CONFIG}/heatmaps/{{slide}}.jpg",
            caption="../report/heatmap.rst",
            category="{task}",
            subcategory="{encoder} {aggregator} heatmaps",
            labels={"slide": "{slide}", "picture": "heatmap"},
        ),
        montage=report(
            f"{OUT}/eval/{CONFIG}/heatmaps/{{slide}}_montage.jpg",
            caption="../report/montage.rst",
            category="{task}",
            subcategory="{encoder} {aggregator} heatmaps",
            labels={"slide": "{slide}", "picture": "top and bottom tiles"},
        ),
    log:
        f"{OUT}/logs/heatmap/{CONFIG}/{{slide}}.log",
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
