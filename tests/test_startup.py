"""Start-up stays cheap: the CLI's help imports neither the HTTP stack nor JSON Schema.

A structural check (which modules a `--help` loads), not a timing: the figure itself is
measured by tests/perf/bench_startup.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HEAVY = ("aiohttp", "httptools", "jsonschema", "pyarrow", "batcher.simulator.app",
         "batcher.runner")


def _loaded_after(code: str) -> set[str]:
    probe = (f"import sys\n{code}\n"
             f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=True)
    return set(done.stdout.split())


def test_help_loads_no_heavy_module() -> None:
    code = ("from click.testing import CliRunner\nfrom batcher.cli import cli\n"
            "for args in (['--help'], ['run', '--help'], ['simulate', '--help']):\n"
            "    result = CliRunner().invoke(cli, args)\n"
            "    assert result.exit_code == 0 and 'Usage' in result.output, result.output")
    assert _loaded_after(code) == set()


def test_the_simulator_package_still_gives_its_names() -> None:
    # The lazy package loads the server when it is asked for, and says so for a wrong name.
    loaded = _loaded_after("from batcher.simulate import SimulatorThread, make_app\n"
                           "import batcher.simulator as s\n"
                           "try:\n    s.nothing\nexcept AttributeError:\n    pass\n"
                           "else:\n    raise SystemExit('no AttributeError')")
    assert "batcher.simulator.app" in loaded and "aiohttp" in loaded


@pytest.mark.parametrize(("given", "used"), [(None, "system"), ("mimalloc", "mimalloc")])
def test_the_command_takes_arrows_memory_from_malloc_unless_told(given: str | None,
                                                                 used: str) -> None:
    # What malloc frees, release_memory() gives back; Arrow's default allocator keeps it.
    code = ("import sys\nsys.argv = ['batcher', '--version']\nfrom batcher.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "import pyarrow\nprint(pyarrow.default_memory_pool().backend_name)")
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if given is not None:
        env["ARROW_DEFAULT_MEMORY_POOL"] = given
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=60, check=True).stdout.split()
    assert out[-1] == used
