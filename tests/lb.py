"""A TCP load balancer for tests: several scheduler replicas behind one address.

    python -m tests.lb --listen 127.0.0.1:PORT --backend 127.0.0.1:A --backend 127.0.0.1:B

Each new connection goes to the next backend in turn that accepts it (a dead replica is skipped), then bytes
are copied both ways until either side closes. Loopback or a test's own bridge address only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def main(listen: tuple[str, int], backends: list[tuple[str, int]]) -> None:
    turn = itertools.cycle(range(len(backends)))

    async def handle(creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        first = next(turn)
        for k in range(len(backends)):
            host, port = backends[(first + k) % len(backends)]
            try:
                breader, bwriter = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
            except (OSError, TimeoutError):
                continue
            await asyncio.gather(pipe(creader, bwriter), pipe(breader, cwriter))
            return
        cwriter.close()  # no replica up: the client sees the connection close and retries

    server = await asyncio.start_server(handle, listen[0], listen[1], backlog=2048, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True, type=_addr)
    p.add_argument("--backend", action="append", required=True, type=_addr)
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(args.listen, args.backend))
