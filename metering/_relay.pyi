from typing import Any

class RecordLog:
    def take(self) -> list[Any]: ...
    def __len__(self) -> int: ...

def configure(
    report_type: type[tuple[Any, ...]],
    usage_type: type[tuple[Any, ...]],
    cost_type: type[tuple[Any, ...]],
    header_names: tuple[bytes, ...],
) -> None: ...
def relay(
    body: bytes,
    model_key: bytes,
    ctx: Any,
    decision: Any,
    replica_url: str,
    operation: str,
    marginal_ratio: tuple[int, int],
    loaded_ratio: tuple[int, int],
    now: float,
    log: RecordLog | None,
) -> Any: ...
