"""Launchers around `gpt-train train`: SLURM through submitit, torchrun on this machine (one node of many, or
all of it), or a Docker container. `python launch/submit.py --help` (installed as `gpt-train-submit`).

    spec.py    what a submission runs, whatever the backend: config, overrides, fixed run_dir, environment
    slurm.py   SLURM via submitit: resources, the job script's setup and requeue logic, the per-task callable
    local.py   torchrun on this node (and the lines for the other nodes), or the same inside `docker run`; the
               copy of a local run's output to its log file
    sweep.py   --sweep: the product of the values, each element's overrides and run directory
    chain.py   --after and --then: sbatch dependencies, the follow-up command
    snapshot.py  the code a job imports: gpt_train/, launch/, configs/ copied at submission, with its commit
    submit.py  the command line

slurm/pretrain.sbatch does what slurm.py does, for people who call sbatch themselves. docs/launching.md.
"""
