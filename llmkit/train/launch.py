"""`--num-processes` and friends: relaunch the same command under `accelerate launch` (no launcher of our own).

`llmkit pretrain --num-processes 8 ...` runs `accelerate launch --multi_gpu --num_processes 8 ... -m llmkit
pretrain ...` with the launch options removed, and returns its exit code. Without CUDA the processes talk over
gloo on the CPU. A command already running under a launcher (accelerate launch, torchrun, Slurm's srun with
torchrun) is left alone, so `accelerate launch -m llmkit pretrain ...` and `torchrun -m llmkit ...` work as well.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from llmkit.errors import UserError

LAUNCH_OPTIONS = (
    "--num-processes",
    "--num-machines",
    "--machine-rank",
    "--main-process-ip",
    "--main-process-port",
    "--accelerate-config",
)


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ or world_size() > 1


def world_size() -> int:
    """WORLD_SIZE as torchrun and accelerate launch set it (1 when unset); one line when it is not a count."""
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.strip().isdigit() or int(text) < 1:
        raise UserError(
            f"WORLD_SIZE={text[:40]!r}: not a number of processes (torchrun and accelerate launch set "
            "it); unset it, or use --num-processes"
        )
    return int(text)


def relaunch(
    argv: list[str],
    num_processes: int | None,
    num_machines: int | None,
    machine_rank: int | None,
    main_process_ip: str | None,
    main_process_port: int | None,
    accelerate_config: Path | None = None,
    single_process_launch: str | None = None,
    cpu: bool = False,
) -> int | None:
    """Run `argv` (this command's arguments) under accelerate launch; None when no relaunch is needed.

    `single_process_launch` ("--use_deepspeed" or "--use_fsdp") relaunches even a single process through that
    launcher mode: DeepSpeed and FSDP expect the environment a launcher sets up. An `accelerate_config` file
    (from `accelerate config`) is handed to `accelerate launch --config_file`; the launch options given here
    override its values. `cpu` hides the GPUs from the processes (distributed.device=cpu).
    """
    processes = 1 if num_processes is None else num_processes
    machines = 1 if num_machines is None else num_machines
    if processes < 1 or machines < 1:
        raise UserError(f"--num-processes {processes}, --num-machines {machines}: each must be at least 1")
    if machine_rank is not None and not 0 <= machine_rank < machines:
        raise UserError(f"--machine-rank {machine_rank}: a rank of {machines} machine(s) is 0 to {machines - 1}")
    if main_process_port is not None and not 0 < main_process_port < 65536:
        raise UserError(f"--main-process-port {main_process_port}: a port is 1 to 65535")
    if accelerate_config is not None and not accelerate_config.is_file():
        raise UserError(f"{accelerate_config}: accelerate config file not found (write one with `accelerate config`)")
    wanted = processes > 1 or machines > 1 or single_process_launch is not None or accelerate_config is not None
    if not wanted or under_launcher():
        return None
    if machines > 1 and main_process_ip is None:
        raise UserError("--num-machines > 1 needs --main-process-ip (the address of machine rank 0)")
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config is not None:
        given = {
            "--num_processes": num_processes and processes * machines,
            "--num_machines": num_machines,
            "--machine_rank": machine_rank,
            "--main_process_ip": main_process_ip,
            "--main_process_port": main_process_port,
        }
        command += ["--config_file", str(accelerate_config)]
        command += [str(part) for name, value in given.items() if value is not None for part in (name, value)]
    else:
        command += _launch_options(
            processes, machines, machine_rank, main_process_ip, main_process_port, single_process_launch
        )
    command += ["-m", "llmkit", *strip_launch_options(argv)]
    print(f"launching {processes * machines} process(es): {' '.join(command[2:])}", file=sys.stderr, flush=True)
    return run_launcher(command, {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"} if cpu else {})


def _launch_options(
    processes: int,
    machines: int,
    machine_rank: int | None,
    main_process_ip: str | None,
    main_process_port: int | None,
    single_process_launch: str | None,
) -> list[str]:
    """accelerate launch's options without a config file. --multi_gpu also serves CPU runs: llmkit's Accelerator
    picks gloo when there is no GPU. DeepSpeed is configured by llmkit itself (the strategy's file), so the launcher
    only starts the processes; a single process is started in DeepSpeed's or FSDP's launcher mode (--multi_gpu
    wants two or more)."""
    single = processes * machines == 1
    options = [
        (single_process_launch or "--multi_gpu") if single else "--multi_gpu",
        "--num_processes",
        str(processes * machines),
        "--num_machines",
        str(machines),
        "--machine_rank",
        str(machine_rank or 0),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(main_process_port or 29500),
    ]
    return options + (["--main_process_ip", main_process_ip] if main_process_ip else [])


EXIT_DIR = "LLMKIT_EXIT_DIR"
LAUNCHER_FAILURE = re.compile(r"^(Traceback \(most recent call last\)|[EW]\d{4} .*torch/distributed/elastic)")


def run_launcher(command: list[str], env: dict[str, str] | None = None) -> int:
    """Run the launcher and return llmkit's exit code, not the launcher's.

    torchrun turns any worker's non-zero exit into 1 and a traceback of its own. Workers record why they
    exited (a user error: 2, divergence: 3, preemption: 75) in a directory this function reads afterwards;
    when they did, the launcher's failure report is dropped and their code is returned, so one line and the
    right code reach the user (and a requeue script sees 75). A worker that crashed records nothing, and
    everything the launcher printed is shown.
    """
    with tempfile.TemporaryDirectory(prefix="llmkit-exit-") as exit_dir:
        environment = {**os.environ, **(env or {}), EXIT_DIR: exit_dir}
        process = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True, bufsize=1)
        held: list[str] = []
        shown: set[str] = set()
        assert process.stderr is not None
        for line in process.stderr:
            if held or LAUNCHER_FAILURE.match(line):
                held.append(line)
            elif not (line.startswith("error: ") and line in shown):  # the same error from every rank: once
                shown.add(line)
                sys.stderr.write(line)
                sys.stderr.flush()
        code = process.wait()
        recorded = sorted(Path(exit_dir).glob("rank-*"), key=lambda p: int(p.name.removeprefix("rank-")))
        if code != 0 and recorded:
            return int(recorded[0].read_text())
        sys.stderr.writelines(held)
        return code


def record_exit(code: int) -> None:
    """Under llmkit's relaunch, tell it why this worker exits (see run_launcher)."""
    folder = os.environ.get(EXIT_DIR)
    if folder and code and Path(folder).is_dir():
        (Path(folder) / f"rank-{os.environ.get('RANK', '0')}").write_text(str(code))


def strip_launch_options(argv: list[str]) -> list[str]:
    """`argv` without the launch options (as `--opt value` or `--opt=value`)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCH_OPTIONS:
            skip = "=" not in arg
            continue
        out.append(arg)
    return out
