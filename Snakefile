# pathmil workflow: slides in, tiles, features, trained MIL models and a report out.
# Settings: config/config.yaml (the demo); a real cohort: --configfile config/cohorts/NAME.yaml.
# Every rule calls the `pathmil` command with quoted arguments and a settings file, so the logic lives in
# the package; see workflow/rules/. Parsing needs only Snakemake (the demo's plan also needs pathmil).
from snakemake.utils import min_version

min_version("9.0")


# The demo's settings apply only when no --configfile is given: a cohort file replaces them instead of
# being merged into them (a merge would keep the demo's slides and tasks). --config key=value still
# overrides single settings of either.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/resources.smk"
include: "workflow/rules/settings.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/cohort.smk"
include: "workflow/rules/tile.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/split.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/transfer.smk"
include: "workflow/rules/report.smk"


# Small bookkeeping jobs run where snakemake runs, not as cluster jobs.
localrules:
    all,
    settings,
    cohort,
    collect,
    split,
    search,
    summary,
    qc_gallery,


rule all:
    default_target: True
    input:
        all_targets,
