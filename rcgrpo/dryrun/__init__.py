"""`rcgrpo dryrun`: one RC-GRPO iteration of a full-size architecture with random weights.

- `archs`: the architectures (public checkpoint configs), parameter counts, the random pipeline;
- `memory`: the analytic memory model and the settings that make a config fit;
- `measure`: time and peak memory per phase, listening to the trainer's phases;
- `run`: the dry run itself; `report`: its table and JSON.
"""
