# pathmil workflow: slides in, tiles, features, trained MIL models and a report out.
# Settings: config/config.yaml (the demo); a real cohort: --configfile config/cohorts/NAME.yaml.
# Every rule calls the `pathmil` command, so the logic lives in the package; see workflow/rules/.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/cohort.smk"
include: "workflow/rules/tile.smk"


rule all:
    input:
        all_targets,
    default_target: True
