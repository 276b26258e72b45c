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
    for name, flag in (
        ("train", "--out"),
        ("eval-pair", "--pair"),
        ("bench", "--prompt-data"),
        ("distill", "--draft-size"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "specdec.cli", name, "--help"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert flag in out.stdout, (name, out.stdout[:300])
