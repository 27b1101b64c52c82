# The report: `snakemake --report report.html` after a run gathers what is flagged with report() here.


# Pages (HTML, self-contained: pathmil/evaluation/report.py) and tables, each a report() result in a category.
# The summary page is also the front page's table (workflow/report/workflow.rst includes it).


rule summary:
    input:
        evals=[f"{eval_dir(*c)}/metrics.json" for c in configurations()]
        + external_evaluations(),
        table=f"{OUT}/cohort.csv",
        failures=f"{OUT}/failures.csv",
    output:
        page=report(
            f"{OUT}/report/summary.html",
            caption="../report/summary_page.rst",
            category="Summary",
            labels={"page": "main metric per task and aggregator"},
        ),
        summary=report(
            f"{OUT}/report/summary.csv",
            caption="../report/summary.rst",
            category="Summary",
            labels={"page": "every metric (CSV)"},
        ),
        failures=report(
            f"{OUT}/report/failures.csv",
            caption="../report/failures.rst",
            category="Summary",
            labels={"page": "failed slides (CSV)"},
        ),
    log:
        f"{OUT}/logs/summary.log",
    conda:
        ENV
    params:
        evals=lambda wildcards, input: [os.path.dirname(p) for p in input.evals],
    shell:
        "(pathmil summary --evals {params.evals:q} --out {output.summary:q} --html {output.page:q} "
        "--cohort {input.table:q} --failures {input.failures:q} "
        "&& cp {input.failures:q} {output.failures:q}) > {log:q} 2>&1"


rule qc_gallery:
    input:
        table=f"{OUT}/cohort.csv",
        failures=f"{OUT}/failures.csv",
        qc=lambda wildcards: [f"{OUT}/qc/{s}.png" for s in slide_ids()],
        facts=lambda wildcards: [f"{OUT}/tiles/{s}.json" for s in slide_ids()],
    output:
        report(
            f"{OUT}/report/qc_gallery.html",
            caption="../report/qc_gallery.rst",
            category="Quality control",
            labels={"page": "every slide's tiling"},
        ),
    log:
        f"{OUT}/logs/qc_gallery.log",
    conda:
        ENV
    params:
        qc=f"{OUT}/qc",
        tiles=f"{OUT}/tiles",
        limit=config["report"]["qc_thumbnails"],
    shell:
        "pathmil qc-gallery --cohort {input.table:q} --qc-dir {params.qc:q} --tiles-dir {params.tiles:q} "
        "--failures {input.failures:q} --max-slides {params.limit} --out {output:q} > {log:q} 2>&1"
