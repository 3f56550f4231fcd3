"""`python -m ema_jax explain`: a table for people, JSON for scripts, one-line errors."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

import ema_jax
from ema_jax import __main__ as cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
CIFAR = ["--ema-alpha", "2.5e-4", "--batch-size", "128", "--max-epoch", "100"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "ema_jax", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )


def test_explain_prints_a_table_for_people():
    out = run_cli("explain", *CIFAR, "--dataset-size", "50000", "--warmup-epochs", "1")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    report = ema_jax.explain(
        ema_alpha=2.5e-4, batch_size=128, max_epoch=100, dataset_size=50_000, warmup_epochs=1
    )
    assert out.stdout == str(report) + "\n"
    for text in ("per-update alpha, linear", "0.01024 <- rule", "half-life, share of training"):
        assert text in out.stdout
    assert "13 per epoch, 1300 in the run, 1287 after warmup" in out.stdout


def test_explain_json_is_one_object_matching_the_python_report():
    args = [*CIFAR, "--steps-per-epoch", "390", "--update-period", "16", "--rule", "exact"]
    out = run_cli("explain", *args, "--dtype", "bfloat16", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    report = ema_jax.explain(
        ema_alpha=2.5e-4,
        batch_size=128,
        max_epoch=100,
        steps_per_epoch=390,
        update_period=16,
        rule="exact",
        dtype="bfloat16",
    )
    assert data == report.to_dict()
    assert data["alpha"] == data["alpha_exact"] and data["updates_per_epoch"] == 25


def test_explain_json_has_nulls_without_the_epoch_length(capsys):
    code, out, _ = run_in_process(capsys, "explain", *CIFAR, "--ema-alpha", "0", "--json")
    assert code == 0
    data = json.loads(out)  # the last --ema-alpha wins
    assert data["half_life_updates"] is None and data["half_life_epochs"] is None
    assert data["updates_total"] is None and data["warnings"][0].startswith("EMA off")


def run_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``main(args)`` here, for the many error cases: (exit code, stdout, stderr)."""
    try:
        code = cli.main(list(args))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_argument_in_a_subprocess_gives_one_line_and_exit_2():
    out = run_cli("explain", *CIFAR, "--ema-alpha", "-1")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == (
        "python -m ema_jax explain: error: ema_alpha must be a finite number >= 0, got -1\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*CIFAR, "--ema-alpha", "-1"], "ema_alpha must be a finite number >= 0, got -1"),
        (CIFAR[:4], "the following arguments are required: --max-epoch"),
        ([*CIFAR, "--batch-size", "lots"], "batch_size must be a number, got 'lots'"),
        ([*CIFAR, "--update-period", "2.5"], "update_period must be an integer in"),
        ([*CIFAR, "--rule", "cosine"], "argument --rule: invalid choice: 'cosine'"),
        ([*CIFAR, "--dtype", "int8"], "dtype must be a floating dtype, got 'int8'"),
        ([*CIFAR, "--dataset-size", "50000", "--steps-per-epoch", "5"], "does not match"),
        ([*CIFAR, "--dataset-size", "100"], "dataset_size=100 is smaller than batch_size=128"),
        ([*CIFAR, "--max-epoch", "nan"], "max_epoch must be a finite number > 0, got nan"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(capsys, args, message):
    code, out, err = run_in_process(capsys, "explain", *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("python -m ema_jax explain: error: ")
    assert message in err


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["explain", *CIFAR, "--bogus"]])
def test_bad_command_gives_one_line_and_exit_2(capsys, args):
    code, _, err = run_in_process(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("python -m ema_jax")


def test_help_lists_every_option(capsys):
    code, out, _ = run_in_process(capsys, "explain", "--help")
    assert code == 0
    for option in (
        "--ema-alpha",
        "--batch-size",
        "--max-epoch",
        "--update-period",
        "--warmup-epochs",
        "--steps-per-epoch",
        "--dataset-size",
        "--rule",
        "--dtype",
        "--json",
    ):
        assert option in out


def test_readme_shows_the_real_output(capsys):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("$ python -m ema_jax explain ", 1)[1].split("```", 1)[0]
    command, shown = block.split("\n", 2)[:2], block.split("\n", 2)[2]
    args = " ".join(line.rstrip("\\ ") for line in command).split()
    code, out, _ = run_in_process(capsys, "explain", *args)
    assert code == 0
    assert "half-life, share of training" in shown
    assert out == shown, "README.md's explain output is stale: rerun the command"


@pytest.mark.parametrize(
    ("args", "schedule"),
    [
        (
            [
                "--schedule",
                "power_function",
                "--sigma-rel",
                "0.05",
                "--batch-size",
                "256",
                "--total-steps",
                "100000",
            ],
            ema_jax.schedules.power_function(sigma_rel=0.05, batch_size=256),
        ),
        (
            ["--schedule", "constant", "--decay", "0.999", "--debias", "--update-period", "4"],
            ema_jax.schedules.constant(0.999, debias=True, update_period=4),
        ),
        (
            [
                "--schedule",
                "fraction_of_training",
                "--halflife-fraction",
                "0.05",
                "--total-steps",
                "20000",
            ],
            ema_jax.schedules.fraction_of_training(halflife_fraction=0.05, total_steps=20000),
        ),
        (
            ["--schedule", "warmup_power", "--update-after-step", "10"],
            ema_jax.schedules.warmup_power(update_after_step=10),
        ),
    ],
)
def test_explain_reports_any_schedule_as_python_does(capsys, args, schedule):
    code, out, err = run_in_process(capsys, "explain", *args, "--json")
    assert code == 0, err
    # --total-steps goes to explain, or to the schedule when it is the schedule's own.
    total = args[args.index("--total-steps") + 1] if "--total-steps" in args else None
    own = hasattr(schedule, "total_steps")
    expected = ema_jax.explain(schedule, total_steps=None if own or total is None else int(total))
    assert json.loads(out) == json.loads(json.dumps(expected.to_dict()))
    code, table, _ = run_in_process(capsys, "explain", *args)
    assert table == str(expected) + "\n"


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--schedule", "constant"], "the following arguments are required: --decay"),
        (
            ["--schedule", "constant", "--decay", "0.9", "--ema-alpha", "1e-3"],
            "--ema-alpha does not apply to --schedule constant",
        ),
        (["--schedule", "constant", "--decay", "1.5"], "decay must be a number in [0, 1), got 1.5"),
        (
            ["--schedule", "power_function", "--batch-size", "8"],
            "power_function needs exactly one of sigma_rel and gamma",
        ),
        (["--schedule", "cosine"], "argument --schedule: invalid choice: 'cosine'"),
        (
            [
                "--schedule",
                "halflife",
                "--halflife-samples",
                "100",
                "--batch-size",
                "8",
                "--dataset-size",
                "100",
            ],
            "dataset_size=100 applies to pycls schedules only",
        ),
    ],
)
def test_bad_schedule_options_give_one_line_and_exit_2(capsys, args, message):
    code, out, err = run_in_process(capsys, "explain", *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err


def test_explain_takes_constants_form(capsys):
    code, out, err = run_in_process(
        capsys,
        "explain",
        "--schedule",
        "constant",
        "--decay",
        "0.999999",
        "--form",
        "nnx",
        "--json",
    )
    assert code == 0, err
    expected = ema_jax.explain(ema_jax.schedules.constant(0.999999, form="nnx"))
    assert json.loads(out) == json.loads(json.dumps(expected.to_dict()))
    assert expected.fixed_point_bias is not None
    code, _, err = run_in_process(
        capsys, "explain", "--schedule", "constant", "--decay", "0.9", "--form", "flax"
    )
    assert code == 2 and "invalid choice: 'flax'" in err
