"""A metered or an unmetered bench gateway: its configuration and its environment.

``run.py`` (on vs off) and ``ablate.py`` (variants side by side) start the same
two kinds of gateway; this is where what "on" and "off" mean is written once.
"""

from __future__ import annotations

from typing import Any

from bench.lib.entry import clean_env
from bench.lib.stack import Server, gateway_config


def side(
    sim: Server,
    keys: list[dict[str, Any]],
    redis_url: str,
    collector: str,
    *,
    metered: bool,
    sampling: float | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """``(config, env)`` for one gateway on ``sim``, its ledger in Redis at ``redis_url``.

    Metered: metering on (the default), spans over OTLP/HTTP to ``collector`` at
    ``sampling`` (``parentbased_traceidratio``), or at the gateway's own default when
    None. Unmetered: ``metering: {enabled: false}`` and no ``OTEL_*`` variables.
    """
    env = clean_env()
    if not metered:
        return gateway_config(sim, keys, redis={"url": redis_url}, metering={"enabled": False}), env
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector
    if sampling is not None:
        env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        env["OTEL_TRACES_SAMPLER_ARG"] = str(sampling)
    return gateway_config(sim, keys, redis={"url": redis_url}), env
