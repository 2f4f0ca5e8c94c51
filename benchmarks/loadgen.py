"""A light HTTP load generator for the benchmark: one asyncio process, one raw keep-alive connection per concurrent
client, requests written and responses parsed by hand (no HTTP library), so the client takes little of the CPU
it shares with the server. It reports its own CPU time, so a measurement says how much the client cost."""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    requests: int
    failed: int
    seconds: float
    client_cpu_s: float  # CPU time this process spent generating the load
    latencies: list[float] = field(default_factory=list)  # successful requests, in order of completion

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _request(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length bodies, as the server sends them); return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next((int(v) for k, _, v in (ln.partition(":") for ln in lines[1:]) if k.lower() == "content-length"), 0)
    await reader.readexactly(length)
    return status


async def _client(port: int, path: str, bodies: Sequence[bytes], result: LoadResult) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for body in bodies:
            start = time.perf_counter()
            try:
                writer.write(_request(path, body))
                status = await _response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                status = 0
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            result.requests += 1
            if status == 200:
                result.latencies.append(time.perf_counter() - start)
            else:
                result.failed += 1
    finally:
        writer.close()


def run_load(port: int, texts: Sequence[str], concurrency: int, total: int, path: str = "/predict",
             body: Callable[[str], dict] = lambda text: {"text": text}) -> LoadResult:
    """`total` requests (one text each) from `concurrency` keep-alive connections, as fast as answers come."""
    per_client = -(-total // concurrency)
    bodies = [json.dumps(body(texts[i % len(texts)])).encode() for i in range(per_client * concurrency)]
    result = LoadResult(0, 0, 0.0, 0.0)

    async def main() -> None:
        await asyncio.gather(*(_client(port, path, bodies[c * per_client:(c + 1) * per_client], result)
                               for c in range(concurrency)))

    cpu, start = _cpu_seconds(), time.perf_counter()
    asyncio.run(main())
    result.seconds, result.client_cpu_s = time.perf_counter() - start, _cpu_seconds() - cpu
    return result


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
