# Types of the C extension dnsproxy/_udpio.c (the compiled build only).
from typing import Any, Final

BATCH_MAX: Final[int]
SIZE_MAX: Final[int]

def recv_batch(fd: int, count: int, /) -> list[tuple[bytes, Any]]: ...
def send_batch(
    fd: int, replies: list[bytes], addresses: list[Any], /
) -> tuple[int, int] | None: ...
def send_to(fd: int, reply: bytes, address: Any, /) -> int: ...
def splice(query: bytes, head: bytes, qend: int, tail: bytes, /) -> bytes: ...
def aged_prepare(
    body: bytes,
    offsets: tuple[int, ...],
    ttls: tuple[int, ...],
    age: int,
    qend: int,
    plain_opt: bytes,
    do_opt: bytes,
    /,
) -> tuple[bytes, bytes, bytes, bytes, bytes]: ...
