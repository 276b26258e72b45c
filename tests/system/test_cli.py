"""The `specdec` command: light to start, every subcommand reachable."""

from __future__ import annotations

import subprocess
import sys


def test_healthcheck_does_not_import_torch() -> None:
    # Container HEALTHCHECKs run it every few seconds: it must not load torch/transformers.
    code = (
        "import sys\n"
        "from specdec.cli import main\n"
        "try:\n"
        "    main(['healthcheck', '127.0.0.1:1', '--timeout', '0.1'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "NOT SERVING" in out.stdout
    assert "HEAVY []" in out.stdout, out.stdout


def test_delegated_subcommands_show_their_own_help() -> None:
    flags = {
        "train": "--out",
        "eval-pair": "--pair",
        "bench": "--prompt-data",
        "distill": "--draft-size",
    }
    runs = {  # at once: each imports torch and transformers
        name: subprocess.Popen(
            [sys.executable, "-m", "specdec.cli", name, "--help"], stdout=subprocess.PIPE, text=True
        )
        for name in flags
    }
    for name, run in runs.items():
        stdout, _ = run.communicate(timeout=120)
        assert run.returncode == 0, (name, stdout[:300])
        assert flags[name] in stdout, (name, stdout[:300])
