"""The README's commands are real: every command line in its code blocks parses with that command's own
parser (flags, types, choices, config validation), the Python block runs, and the MiniBench commands
run end to end on a reduced size."""
import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def command_lines() -> list[list[str]]:
    lines = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith(("#", "make ", "export ")):
                lines.append(shlex.split(line))
    return lines


def _after(argv: list[str], marker: str) -> list[str]:
    return argv[argv.index(marker) + 1 :]


def parse_command(argv: list[str]):
    """Parse (never run) one README command with the parser its program uses; returns the parsed options."""
    from rcgrpo.cli.parsing import parse

    if argv[:3] == ["python", "-m", "rcgrpo.reward_server"]:
        from rcgrpo.rewards.server_cli import parse_options

        return parse_options(argv[3:])
    if "-m" in argv and argv[argv.index("-m") + 1] == "rcgrpo.train":  # accelerate launch / torchrun
        argv = ["rcgrpo", "train", *_after(argv, "rcgrpo.train")]
    assert argv[0] == "rcgrpo", f"not an rcgrpo command: {argv}"
    command, rest = argv[1], argv[2:]
    if command == "train":
        from rcgrpo.cli.train import TrainCommandArguments
        from rcgrpo.train.config import PRESETS, RCGRPOConfig

        options, config = parse((TrainCommandArguments, RCGRPOConfig), rest, "rcgrpo train")
        assert options.preset is None or options.preset in PRESETS
        return config
    if command == "eval":
        from rcgrpo.cli.eval import parse_eval_args

        return parse_eval_args(rest)
    if command == "edit":
        from rcgrpo.cli.edit import EditArguments

        return parse((EditArguments,), rest, "rcgrpo edit")
    if command == "dryrun":
        from rcgrpo.dryrun.settings import DryRunSettings

        settings = parse((DryRunSettings,), rest, "rcgrpo dryrun")
        settings.validate()
        return settings
    if command == "ablate":
        from rcgrpo.minibench.ablate import AblationConfig

        cfg = parse((AblationConfig,), rest, "rcgrpo ablate")
        cfg.validate()
        return cfg
    if command == "minibench":
        from rcgrpo.cli.minibench import MinibenchMakeArguments

        assert rest[0] == "make"
        return parse((MinibenchMakeArguments,), rest[1:], "rcgrpo minibench make")
    if command == "pretrain-tiny":
        from rcgrpo.minibench.pretrain import PretrainConfig

        return parse((PretrainConfig,), rest, "rcgrpo pretrain-tiny")
    if command == "diagnostics":
        from rcgrpo.cli.diagnostics import DiagnosticsArguments, merge_repeated

        return parse((DiagnosticsArguments,), merge_repeated(rest, "--run"), "rcgrpo diagnostics")
    raise AssertionError(f"README command {command!r} is not covered by this test")


def test_the_readme_has_the_commands_it_promises():
    programs = {" ".join(a[:2]) for a in command_lines()}
    assert {"rcgrpo train", "rcgrpo eval", "rcgrpo dryrun", "rcgrpo ablate", "rcgrpo minibench"} <= programs
    assert any("rcgrpo.reward_server" in a for a in command_lines())
    assert any(a[:2] == ["accelerate", "launch"] for a in command_lines())
    assert any(a[0] == "torchrun" and "--nnodes" in a for a in command_lines())


@pytest.mark.parametrize("argv", command_lines(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_parses(argv):
    assert parse_command(argv) is not None


def test_the_python_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = code_blocks("python")
    assert blocks and "RCGRPOTrainer" in blocks[0]
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert (tmp_path / "runs" / "mine" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_the_minibench_commands_run(tmp_path, monkeypatch):
    from rcgrpo.cli import main

    monkeypatch.chdir(tmp_path)
    for argv in command_lines():
        if argv[:3] == ["rcgrpo", "minibench", "make"]:
            argv = [a if a != "16" else "1" for a in argv]  # --per-task 16 → 1
            assert main(argv[1:]) == 0
        elif argv[:2] == ["rcgrpo", "eval"] and "tiny-editor" in argv:
            assert main([*argv[1:], "--limit", "1", "--eval-size", "64"]) == 0
    assert (tmp_path / "runs" / "minibench-eval" / "results.md").is_file()
