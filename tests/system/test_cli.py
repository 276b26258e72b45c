"""The `specdec` command: light to start, every subcommand reachable."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from specdec.launch import free_port


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


def test_up_serves_the_http_api_and_generate_chats(
    chat_model_dir: Callable[[str], Path],
) -> None:
    # `specdec up` on a model with a chat template: its HTTP API answers a chat over
    # curl, and `specdec generate --chat` renders the prompt as a user message.
    port, http_port = free_port(), free_port()
    up = subprocess.Popen(
        [
            sys.executable, "-m", "specdec.cli", "up", "--oracle-model",
            str(chat_model_dir("oracle")), "--no-draft", "--port", str(port),
            "--http-port", str(http_port),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert up.stdout is not None
        lines = []
        for line in up.stdout:
            lines.append(line)
            if line.startswith("specdec is up"):
                break
        assert f"http://localhost:{http_port}/v1" in lines[-1], "".join(lines)
        body = {
            "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 4,
            "temperature": 0, "ignore_eos": True,
        }  # fmt: skip
        answer = subprocess.run(
            ["curl", "-sS", f"http://127.0.0.1:{http_port}/v1/chat/completions",
             "-H", "Content-Type: application/json", "-d", json.dumps(body)],
            capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
        reply = json.loads(answer.stdout)
        assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] == 4
        chat = subprocess.run(
            [sys.executable, "-m", "specdec.cli", "generate", "--chat", "the cat",
             "--system", "be brief", "--gateway", f"127.0.0.1:{port}", "--max-new-tokens", "4",
             "--temperature", "0", "--ignore-eos"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert chat.returncode == 0, chat.stderr
        assert "[length] 4 tokens" in chat.stderr
    finally:
        up.send_signal(signal.SIGINT)  # stops the three services it started
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
