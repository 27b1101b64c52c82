#!/usr/bin/env python3
"""A stand-in for SLURM's commands (sbatch, sacct, squeue, scontrol, sinfo, scancel, sacctmgr), for tests that
check what the workflow asks SLURM for without a cluster. Link it under each command's name into a folder
first on PATH and set STAND_IN_SLURM to a folder for its records.

sbatch appends its arguments and job script to $STAND_IN_SLURM/sbatch.jsonl and prints a job id; sacct and
squeue report every submitted job as FAILED (so Snakemake retries each job and then gives up: every attempt's
request is recorded, and nothing runs); the others answer what the SLURM executor plugin asks of them.
"""

import json
import os
import sys
from pathlib import Path

records = Path(os.environ["STAND_IN_SLURM"])
calls = records / "sbatch.jsonl"
command, args = Path(sys.argv[0]).name, sys.argv[1:]
if command == "sbatch":
    script = sys.stdin.read() if "/dev/stdin" in args else ""
    number = 1000 + (len(calls.read_text().splitlines()) if calls.exists() else 0)
    with calls.open("a") as out:
        out.write(json.dumps({"job_id": str(number), "args": args, "script": script}) + "\n")
    print(number)
elif command in ("sacct", "squeue"):
    if "--name" in args:  # the status query of the plugin's run
        for line in calls.read_text().splitlines() if calls.exists() else []:
            print(f"{json.loads(line)['job_id']}|FAILED")
elif command == "scontrol":
    print("MinJobAge = 300 sec")
