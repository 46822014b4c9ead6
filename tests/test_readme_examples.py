"""README's commands and examples/ are executed, so they cannot rot."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from batcher.simulate import SimConfig, SimulatorThread
from tests.conftest import ROOT, run_cli

README = (ROOT / "README.md").read_text()


def _shell_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", README, flags=re.S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_readme_opens_with_the_try_and_test_commands_and_ci_runs_the_test_one() -> None:
    blocks = _shell_blocks()
    try_it, test_it = blocks[0].strip(), blocks[1].strip()
    assert README.index(try_it) < README.index("## ")         # both before the first section
    assert README.index(test_it) < README.index("## ")
    assert "pip install ." in try_it and "examples/quickstart.sh" in try_it
    assert "pip install -e '.[test]'" in test_it and "pytest" in test_it
    test_command = test_it.split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci


def test_quickstart_runs_a_real_job_end_to_end(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["BATCHER_QUICKSTART_OUT"] = str(tmp_path)
    proc = subprocess.run(["sh", str(ROOT / "examples" / "quickstart.sh"), str(_free_port())],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(tmp_path / "answers.parquet")
    source_rows = sum(1 for _ in (ROOT / "examples" / "prompts.jsonl").open())
    assert table.num_rows == source_rows
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert "rows" in proc.stdout                               # estimate and status printed
    assert f"{source_rows} rows in" in proc.stdout


def test_example_inputs_run_against_the_simulator(tmp_path: Path, sim: SimulatorThread) -> None:
    for name in ("prompts.jsonl", "chat.jsonl", "batch_api.jsonl", "eval.jsonl",
                 "reviews.parquet"):
        extra = (["--template", "Sentiment of: {review}", "--id-column", "review_id"]
                 if name.endswith(".parquet") else [])
        out = tmp_path / f"{name}.parquet"
        result = run_cli("run", ROOT / "examples" / name, "-o", out, "--base-url",
                         sim.base_url, "--model", "gpt-4o-mini", "--no-progress", *extra)
        assert result.exit_code == 0, (name, result.stderr)
        assert set(pq.read_table(out).column("status").to_pylist()) == {"ok"}


def test_readme_structured_output_example_runs_offline(tmp_path: Path) -> None:
    import shlex

    block = next(b for b in _shell_blocks() if "--response-format" in b)
    simulate, run = (line.rstrip(" &") for line in block.strip().splitlines())
    sim_args = shlex.split(simulate)
    assert sim_args[:2] == ["batcher", "simulate"]
    rate = float(sim_args[sim_args.index("--rate-bad-schema") + 1])
    args = shlex.split(run)
    assert args[:2] == ["batcher", "run"]
    with SimulatorThread(SimConfig(rate_bad_schema=rate, seed=1)) as sim:
        args = [sim.base_url if a.startswith("http://127.0.0.1:8000") else a for a in args[1:]]
        args = [str(ROOT / a) if a.startswith("examples/") else a for a in args]
        args[args.index("-o") + 1] = str(tmp_path / "labels.parquet")
        result = run_cli(*args, "--no-progress")
        assert result.exit_code == 0, result.stderr
        assert sim.stats.faults.get("bad_schema", 0) > 0  # some were broken, and re-sent
    table = pq.read_table(tmp_path / "labels.parquet")
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert set(table.column("category").to_pylist()) <= {
        "billing", "bug", "feature_request", "account", "other"}


def test_readme_batch_mode_example_runs_offline(tmp_path: Path) -> None:
    import shlex

    block = next(b for b in _shell_blocks() if "--mode batch" in b)
    simulate, run, status = (line.rstrip(" &") for line in block.strip().splitlines())
    sim_args = shlex.split(simulate)
    assert sim_args[:2] == ["batcher", "simulate"]
    seconds = float(sim_args[sim_args.index("--batch-seconds") + 1])
    fail = float(sim_args[sim_args.index("--batch-fail-rate") + 1])
    args = shlex.split(run)
    assert args[:2] == ["batcher", "run"]
    out = tmp_path / "batch.parquet"
    with SimulatorThread(SimConfig(batch_seconds=seconds, batch_fail_rate=fail)) as sim:
        args = [sim.base_url if a.startswith("http://127.0.0.1:8000") else a for a in args[1:]]
        args = [str(ROOT / a) if a.startswith("examples/") else a for a in args]
        args[args.index("-o") + 1] = str(out)
        result = run_cli(*args, "--no-progress")
        assert result.exit_code == 0, result.stderr
        assert sim.stats.batches.creates >= 1
        shown = run_cli(*shlex.split(status)[1:-1], out)
        assert shown.exit_code == 0 and "completed" in shown.stdout
    table = pq.read_table(out)
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert table.num_rows == 20 and None not in table.column("batch_id").to_pylist()
