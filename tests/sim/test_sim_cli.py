"""`python -m sim` as a real process, and the functions the tollway CLI calls."""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import socket
import sys
import time

import aiohttp
import openai
import pytest

from sim.cli import config_from_args, configure_parser, run
from sim.config import SimConfig


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(argv)


def test_defaults_match_the_config_and_flags_map_to_fields() -> None:
    assert config_from_args(_parse()) == SimConfig()
    config = config_from_args(
        _parse(
            "--model",
            "a",
            "b",
            "--model",
            "c",
            "--max-num-seqs",
            "4",
            "--max-model-len",
            "1024",
            "--decode-base-ms",
            "3",
            "--error-rate",
            "0.25",
            "--unhealthy",
            "--seed",
            "9",
        )
    )
    assert config.served_model_names == ["a", "b", "c"]
    assert (config.max_num_seqs, config.max_model_len, config.decode_base_ms) == (4, 1024, 3.0)
    assert (config.faults.error_rate, config.faults.unhealthy, config.seed) == (0.25, True, 9)
    zero = config_from_args(_parse("--zero-delay", "--decode-base-ms", "5"))
    assert zero.zero_delay
    assert math.isinf(zero.prefill_tokens_per_s)


def test_bad_flags_exit_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(_parse("--output-tokens-min", "10", "--output-tokens-max", "5")) == 2
    assert "output_tokens_min" in capsys.readouterr().err


async def test_python_m_sim_serves_and_stops_on_sigterm() -> None:
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sim",
        "--port",
        str(port),
        "--model",
        "m",
        "m-alias",
        "--zero-delay",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 10
            while True:
                try:
                    async with http.get(f"{base}/health") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "the simulator did not come up"
                assert proc.returncode is None, "the simulator exited"
                await asyncio.sleep(0.05)
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as client:
            assert [m.id for m in (await client.models.list()).data] == ["m", "m-alias"]
            answer = await client.completions.create(model="m-alias", prompt="hi", max_tokens=3)
            assert answer.usage is not None
            assert answer.usage.completion_tokens == 3
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        assert proc.stderr is not None
        await proc.stderr.read()
