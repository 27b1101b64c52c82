# A tiny workflow that tests/test_slurm.py runs through workflow/profiles/slurm, because no rule of the main
# workflow asks for a GPU yet: `gpu_probe` asks for one (the test node has placeholder GPUs, see
# scripts/slurm_cluster.sh); `retry_probe` fails on its first attempt so that the profile's retry resubmits it
# with more memory. Both write down what the SLURM job saw.


rule all:
    input:
        "gpu_probe.txt",
        "retry_probe.txt",


rule gpu_probe:
    output:
        "gpu_probe.txt",
    resources:
        gpu=1,
        mem_mb=500,
        runtime=5,
    shell:
        "(echo pathmil=$(command -v pathmil); env | grep -E '^(SLURM_JOB_ID|SLURM_GPUS_ON_NODE|"
        "CUDA_VISIBLE_DEVICES|PATHMIL_SLURM_TOKEN)=') > {output}"


rule retry_probe:
    output:
        "retry_probe.txt",
    resources:
        runtime=5,  # no mem_mb: the profile's default, which grows with the attempt
    shell:
        "if [ ! -e first_attempt_failed ]; then touch first_attempt_failed; exit 1; fi; "
        "echo mem_mb={resources.mem_mb} > {output}"
