# Each rule's settings file, named by a digest of its content (see settings_file in common.smk).


rule settings:
    output:
        f"{SETTINGS}/{{name}}.yaml",
    log:
        f"{OUT}/logs/settings/{{name}}.log",
    wildcard_constraints:
        name=r"[^/]+\.[0-9a-f]{12}",
    conda:
        ENV
    params:
        text=lambda wildcards, output: SETTINGS_TEXT[output[0]],
    shell:
        "printf '%s' {params.text:q} > {output:q} 2> {log:q}"
