# Across cohorts: packages of the trained folds (`package: true`), a package applied to this cohort's
# slides (`deploy:`, an external test set when the table holds labels), and knowledge transfer into this
# cohort from source packages (`transfer:`: fine-tuning and MoE-PKT beside the baseline from scratch,
# compared with paired statistics). The deploy package's tiling and encoder were applied to the `tile` and
# `extract` settings in common.smk, so the cohort's own tiles and bags are the package's kind; the
# functions these rules call are in common.smk's last section.


rule package:
    input:
        runs=lambda w: [
            f"{run_dir(w.task, w.encoder, w.aggregator, SEEDS[0], k)}/metrics.json"
            for k in FOLDS
        ],
        evaluation=lambda w: f"{eval_dir(w.task, w.encoder, w.aggregator, SEEDS[0])}/metrics.json",
    output:
        package=directory(f"{OUT}/packages/{{task}}/{{encoder}}/{{aggregator}}.pathmil"),
    log:
        f"{OUT}/logs/package/{{task}}/{{encoder}}/{{aggregator}}.log",
    conda:
        ENV
    params:
        runs=lambda wildcards, input: [os.path.dirname(p) for p in input.runs],
        evaluation=lambda wildcards, input: os.path.dirname(input.evaluation),
        cohort=config["cohort"],
    shell:
        "pathmil package --runs {params.runs:q} --evaluation {params.evaluation:q} "
        "--cohort-name {params.cohort:q} --out {output.package:q} > {log:q} 2>&1"


rule deploy_predict:
    input:
        table=f"{OUT}/cohort_ok.csv",
        bags=lambda wildcards: [f"{ONE_FEATURES}/{s}.h5" for s in slide_ids()],
        package=(config.get("deploy") or {}).get("package", []),
    output:
        predictions=f"{DEPLOY_OUT}/predictions.csv",
    log:
        f"{OUT}/logs/deploy/predict.log",
    conda:
        ENV
    threads: 1
    params:
        bags=deploy_bags_args,
    shell:
        "pathmil --threads {threads} predict --package {input.package:q} {params.bags:q} "
        "--out {output.predictions:q} > {log:q} 2>&1"


rule deploy_evaluate:
    input:
        predictions=f"{DEPLOY_OUT}/predictions.csv",
        package=(config.get("deploy") or {}).get("package", []),
        settings=SETTINGS_FILES["evaluate"],
    output:
        metrics=f"{DEPLOY_OUT}/eval/metrics.json",
        summary=report(
            f"{DEPLOY_OUT}/eval/metrics_summary.csv",
            caption="../report/external.rst",
            category="External validation",
        ),
        plots=report(
            directory(f"{DEPLOY_OUT}/eval/plots"),
            patterns=["{name}.png"],
            caption="../report/external.rst",
            category="External validation",
            labels={"plot": "{name}"},
        ),
    log:
        f"{OUT}/logs/deploy/evaluate.log",
    conda:
        ENV
    threads: 1
    params:
        out=lambda wildcards, output: os.path.dirname(output.metrics),
    shell:
        "pathmil --threads {threads} evaluate --predictions {input.predictions:q} "
        "--package {input.package:q} --config {input.settings:q} --out {params.out:q} > {log:q} 2>&1"


rule deploy_heatmap:
    input:
        package=(config.get("deploy") or {}).get("package", []),
        bag=f"{ONE_FEATURES}/{{slide}}.h5",
        settings=SETTINGS_FILES["heatmap"],
    output:
        heatmap=report(
            f"{DEPLOY_OUT}/heatmaps/{{slide}}.jpg",
            caption="../report/heatmap.rst",
            category="External validation",
            labels={"slide": "{slide}", "picture": "heatmap of the package"},
        ),
    log:
        f"{OUT}/logs/deploy/heatmap/{{slide}}.log",
    conda:
        ENV
    threads: 1
    params:
        path=slide_path,
        mpp=slide_mpp_args,
    shell:
        "pathmil --threads {threads} heatmap --package {input.package:q} --features {input.bag:q} "
        "--slide {params.path:q} {params.mpp:q} --config {input.settings:q} "
        "--out {output.heatmap:q} > {log:q} 2>&1"


rule train_transfer:
    input:
        table=f"{OUT}/cohort_ok.csv",
        splits=f"{OUT}/splits/{{task}}.csv",
        settings=lambda wildcards: SETTINGS_FILES[
            f"transfer/{wildcards.task}/{wildcards.strategy}"
        ],
        sources=(TRANSFER or {}).get("sources", []),
    output:
        metrics=f"{OUT}/transfer/{{task}}/{{strategy}}/fold{{fold}}/metrics.json",
        checkpoint=f"{OUT}/transfer/{{task}}/{{strategy}}/fold{{fold}}/best.pt",
        predictions=f"{OUT}/transfer/{{task}}/{{strategy}}/fold{{fold}}/predictions.csv",
    log:
        f"{OUT}/logs/transfer/{{task}}/{{strategy}}/fold{{fold}}.log",
    wildcard_constraints:
        strategy=r"finetune\d*|moe_pkt",
    conda:
        ENV
    threads: 1
    resources:
        gpu=config["train"]["gpus"],
    params:
        run=lambda wildcards, output: os.path.dirname(output.metrics),
        features=ONE_FEATURES,
    shell:
        "pathmil --threads {threads} train --features {params.features:q} --cohort {input.table:q} "
        "--splits {input.splits:q} --fold {wildcards.fold} --config {input.settings:q} "
        "--out {params.run:q} --no-progress > {log:q} 2>&1"


rule compare_transfer:
    input:
        baseline=lambda wildcards: [
            f"{run_dir(wildcards.task, next(iter(ENCODERS)), TRANSFER['baseline'], SEEDS[0], k)}/metrics.json"
            for k in FOLDS
        ],
        transfer=lambda wildcards: [
            f"{OUT}/transfer/{wildcards.task}/{s}/fold{k}/metrics.json"
            for s in TRANSFER_RUNS
            for k in FOLDS
        ],
        settings=SETTINGS_FILES["evaluate"],
    output:
        table=report(
            f"{OUT}/transfer/{{task}}/compare/comparison.csv",
            caption="../report/transfer.rst",
            category="Transfer",
            subcategory="{task}",
        ),
        verdicts=report(
            f"{OUT}/transfer/{{task}}/compare/verdicts.txt",
            caption="../report/transfer.rst",
            category="Transfer",
            subcategory="{task}",
        ),
        plots=report(
            directory(f"{OUT}/transfer/{{task}}/compare/plots"),
            patterns=["{name}.png"],
            caption="../report/transfer.rst",
            category="Transfer",
            subcategory="{task}",
            labels={"plot": "{name}"},
        ),
    log:
        f"{OUT}/logs/transfer/{{task}}/compare.log",
    conda:
        ENV
    threads: 1
    params:
        runs=lambda wildcards, input: [
            os.path.dirname(p) for p in [*input.baseline, *input.transfer]
        ],
        out=lambda wildcards, output: os.path.dirname(output.table),
    shell:
        "pathmil --threads {threads} compare --runs {params.runs:q} --out {params.out:q} "
        "--config {input.settings:q} > {log:q} 2>&1"
