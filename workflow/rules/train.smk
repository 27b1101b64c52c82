# One run per task x encoder x aggregator x seed x fold. Its settings file (task, labels, aggregator,
# model, loop, seed) is an input, so a changed setting reruns exactly the runs it affects. MHIM-MIL runs
# start their teacher from the plain model of the same task, encoder, seed and fold, so those come first.


RUN = run_dir("{task}", "{encoder}", "{aggregator}", "{seed}", "{fold}")
SEARCH_DIR = search_dir("{task}", "{encoder}", "{aggregator}", "{seed}", "{fold}")


rule train:
    input:
        table=f"{OUT}/cohort_ok.csv",
        splits=f"{OUT}/splits/{{task}}.csv",
        settings=train_settings_file,
        searched=searched_settings,
        baseline=baseline_checkpoint,
    output:
        metrics=f"{RUN}/metrics.json",
        checkpoint=f"{RUN}/best.pt",
        predictions=f"{RUN}/predictions.csv",
    log:
        f"{OUT}/logs/train/{{task}}/{{encoder}}/{{aggregator}}/seed{{seed}}/fold{{fold}}.log",
    conda:
        conda_env(config["train"]["gpus"])
    threads: 1
    resources:
        gpu=config["train"]["gpus"],
    params:
        run=lambda wildcards, output: os.path.dirname(output.metrics),
        features=f"{FEATURES}/{{encoder}}",
        teacher=teacher_args,
        searched=lambda wildcards, input: [
            arg for path in input.searched for arg in ("--config", path)
        ],
    shell:
        "pathmil --threads {threads} train --features {params.features:q} --cohort {input.table:q} "
        "--splits {input.splits:q} --fold {wildcards.fold} --config {input.settings:q} "
        "{params.searched:q} "
        "{params.teacher:q} --out {params.run:q} --no-progress > {log:q} 2>&1"


# With `search.n_trials` > 0: an Optuna study per run, on the fold's training and validation parts only
# (its test part is never read), whose best settings then train the run above. `search.jobs` jobs add
# trials to one study (a journal file on the shared filesystem); `search` then writes the best settings.
rule search_trials:
    input:
        table=f"{OUT}/cohort_ok.csv",
        splits=f"{OUT}/splits/{{task}}.csv",
        settings=train_settings_file,
        search=SETTINGS_FILES["search"],
        baseline=baseline_checkpoint,
    output:
        done=f"{SEARCH_DIR}/worker{{worker}}.done",
    log:
        f"{OUT}/logs/search/{{task}}/{{encoder}}/{{aggregator}}/seed{{seed}}/fold{{fold}}-{{worker}}.log",
    conda:
        ENV
    threads: 1
    resources:
        gpu=config["train"]["gpus"],
    params:
        out=lambda wildcards, output: os.path.dirname(output.done),
        features=f"{FEATURES}/{{encoder}}",
        teacher=teacher_args,
        trials=-(-config["search"]["n_trials"] // config["search"]["jobs"]),
    shell:
        "(pathmil --threads {threads} search --features {params.features:q} --cohort {input.table:q} "
        "--splits {input.splits:q} --fold {wildcards.fold} --config {input.settings:q} "
        "--config {input.search:q} {params.teacher:q} --n-trials {params.trials} --out {params.out:q} "
        "&& touch {output.done:q}) > {log:q} 2>&1"


rule search:
    input:
        workers=expand(
            f"{SEARCH_DIR}/worker{{worker}}.done",
            worker=range(config["search"]["jobs"]),
            allow_missing=True,
        ),
        table=f"{OUT}/cohort_ok.csv",
        splits=f"{OUT}/splits/{{task}}.csv",
        settings=train_settings_file,
        search=SETTINGS_FILES["search"],
    output:
        best=f"{SEARCH_DIR}/best.yaml",
        trials=f"{SEARCH_DIR}/trials.csv",
    log:
        f"{OUT}/logs/search/{{task}}/{{encoder}}/{{aggregator}}/seed{{seed}}/fold{{fold}}.log",
    conda:
        ENV
    params:
        out=lambda wildcards, output: os.path.dirname(output.best),
        features=f"{FEATURES}/{{encoder}}",
    shell:
        "pathmil search --features {params.features:q} --cohort {input.table:q} --splits {input.splits:q} "
        "--fold {wildcards.fold} --config {input.settings:q} --config {input.search:q} --n-trials 0 "
        "--out {params.out:q} > {log:q} 2>&1"
