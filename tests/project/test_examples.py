"""examples/: the cron line, systemd units and Slurm scripts parse, and the Slurm scripts' signal and
exit-code handling works (run with a stand-in `align`, `scontrol` and `sbatch`: no cluster needed)."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from align.core.config import parse_config
from align.stages.rs import RSConfig

from conftest import ROOT

EXAMPLES = ROOT / "examples"
SCRIPTS = sorted([*EXAMPLES.glob("slurm/*.sbatch"), *EXAMPLES.glob("slurm/*.sh")])
RUN_FLAGS = {"--workdir", "--set", "--dry-run", "--force"}  # align run's options

# A stand-in for the align CLI: records its arguments, then exits FAKE_RC at once, or waits
# for USR1 and exits 3 as a real stage does after checkpointing.
FAKE_ALIGN = """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_DIR/args"
if [ -n "${FAKE_RC:-}" ]; then exit "$FAKE_RC"; fi
trap 'echo USR1 > "$FAKE_DIR/signal"; exit 3' USR1
touch "$FAKE_DIR/ready"
while true; do sleep 0.05; done
"""
FAKE_RECORDER = """#!/bin/bash
echo "$(basename "$0") $*" >> "$FAKE_DIR/calls"
echo 1234
"""


def test_shell_scripts_parse_and_carry_their_slurm_options():
    assert [p.name for p in SCRIPTS] == ["pipeline.sbatch", "rs_array.sbatch", "rs_merge.sbatch", "submit_rs.sh"]
    for path in SCRIPTS:
        check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, f"{path}: {check.stderr}"
        assert os.access(path, os.X_OK), f"{path} is not executable"
    for name in ("pipeline.sbatch", "rs_array.sbatch"):
        options = re.findall(r"^#SBATCH (\S+)", (EXAMPLES / "slurm" / name).read_text(), re.M)
        assert "--requeue" in options and "--signal=B:USR1@120" in options, name


def test_systemd_units_have_the_expected_keys():
    service = configparser.ConfigParser(interpolation=None, strict=True)
    service.optionxform = str  # systemd keys are case-sensitive
    service.read(EXAMPLES / "systemd" / "align-pipeline.service")
    assert service["Service"]["Type"] == "oneshot"
    command = shlex.split(service["Service"]["ExecStart"])
    assert command[0].endswith("/align") and command[1] == "run" and command[3] == "--workdir"
    assert set(service["Service"]["SuccessExitStatus"].split()) == {"3", "75"}  # interrupted, locked
    assert service["Service"]["KillSignal"] == "SIGTERM" and int(service["Service"]["TimeoutStopSec"]) >= 120
    assert service["Service"]["KillMode"] == "mixed"  # SIGTERM to align run only: it stops its stage itself

    timer = configparser.ConfigParser(interpolation=None, strict=True)
    timer.optionxform = str
    timer.read(EXAMPLES / "systemd" / "align-pipeline.timer")
    assert timer["Timer"]["OnCalendar"] and timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["Unit"] == "align-pipeline.service" and timer["Install"]["WantedBy"] == "timers.target"


def test_cron_line():
    lines = [
        line
        for line in (EXAMPLES / "cron" / "align.crontab").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(lines) == 1
    fields = lines[0].split(None, 5)
    assert all(re.fullmatch(r"[\d*/,-]+", f) for f in fields[:5]), fields[:5]  # minute hour day month weekday
    command = fields[5]
    assert "align run " in command and command.endswith("|| [ $? -eq 75 ]")  # locked is not an error
    assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0
    flags = {t for t in shlex.split(command.split("align run", 1)[1].split(">>")[0]) if t.startswith("--")}
    assert flags <= RUN_FLAGS


@pytest.fixture()
def fakes(tmp_path):
    """A bin dir with the stand-in align, scontrol and sbatch, and the env that uses them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("align", FAKE_ALIGN), ("scontrol", FAKE_RECORDER), ("sbatch", FAKE_RECORDER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "ALIGN": str(bin_dir / "align"),
        "FAKE_DIR": str(tmp_path),
    }
    return tmp_path, env


def run_script(name: str, env: dict, usr1: bool) -> subprocess.CompletedProcess:
    """Run an example script; with ``usr1``, send it USR1 (as Slurm's --signal=B:USR1 does) once align runs."""
    proc = subprocess.Popen(
        ["bash", str(EXAMPLES / "slurm" / name)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if usr1:
        deadline = time.time() + 20
        while not (Path(env["FAKE_DIR"]) / "ready").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=20)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def calls(tmp: Path) -> list[str]:
    path = tmp / "calls"
    return path.read_text().splitlines() if path.exists() else []


def test_pipeline_script_forwards_usr1_and_requeues_on_exit_3(fakes):
    tmp, env = fakes
    done = run_script("pipeline.sbatch", {**env, "SLURM_JOB_ID": "42"}, usr1=True)
    assert done.returncode == 0, done.stdout
    assert (tmp / "signal").read_text() == "USR1\n"  # align got the warning signal
    assert calls(tmp) == ["scontrol requeue 42"]
    args = (tmp / "args").read_text().splitlines()
    assert (
        args[:2] == ["run", "configs/recipes/quickstart.yaml"] and {a for a in args if a.startswith("--")} <= RUN_FLAGS
    )


@pytest.mark.parametrize("rc, expected", [(0, 0), (75, 0), (1, 1), (2, 2)])
def test_pipeline_script_exit_codes(fakes, rc, expected):
    tmp, env = fakes
    done = run_script("pipeline.sbatch", {**env, "SLURM_JOB_ID": "42", "FAKE_RC": str(rc)}, usr1=False)
    assert done.returncode == expected, done.stdout
    assert calls(tmp) == []  # only an interrupted run is requeued


def test_rs_array_task_samples_its_part_and_requeues_itself(fakes):
    tmp, env = fakes
    slurm = {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_JOB_ID": "7"}
    done = run_script("rs_array.sbatch", {**env, **slurm}, usr1=True)
    assert done.returncode == 0, done.stdout
    assert calls(tmp) == ["scontrol requeue 7_1"]
    args = (tmp / "args").read_text().splitlines()
    cfg = parse_config(RSConfig, args[1:])  # the flags are real rs options
    assert args[0] == "rs" and cfg.shard == "1/3" and cfg.output_dir == "runs/rs-parts/part-1"


def test_rs_merge_names_every_part(fakes):
    tmp, env = fakes
    done = run_script("rs_merge.sbatch", {**env, "N": "3", "FAKE_RC": "0"}, usr1=False)
    assert done.returncode == 0, done.stdout
    cfg = parse_config(RSConfig, (tmp / "args").read_text().splitlines()[1:])
    assert (
        cfg.merge == [f"runs/rs-parts/part-{i}" for i in range(3)]
        and cfg.shard is None
        and cfg.output_dir == "runs/rs"
    )


def test_submit_rs_chains_the_merge_after_the_array(fakes):
    tmp, env = fakes
    done = subprocess.run(
        ["bash", str(EXAMPLES / "slurm" / "submit_rs.sh"), "16", "4"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    assert calls(tmp) == [
        f"sbatch --parsable --array=0-15%4 {EXAMPLES / 'slurm' / 'rs_array.sbatch'}",
        f"sbatch --parsable --dependency=afterok:1234 --export=ALL,N=16 {EXAMPLES / 'slurm' / 'rs_merge.sbatch'}",
    ]
