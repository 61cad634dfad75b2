"""A loopback TCP proxy that can refuse connections and cut live ones: a real network fault."""

from __future__ import annotations

import asyncio
import contextlib

# asyncpg's COMMIT: a simple Query message ('Q', length 12, "COMMIT;\0").
PG_COMMIT = b"Q\x00\x00\x00\x0cCOMMIT;\x00"


class FaultyProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.refuse_next = 0  # close this many new connections at once
        self.accepted = 0  # connections passed through to the server
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._live: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # See cut_answer_to_commit.
        self._commit_marker: bytes | None = None
        self.commits_cut = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse_next > 0:
            self.refuse_next -= 1
            self.refused += 1
            writer.close()
            return
        self.accepted += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._live |= {writer, up_writer}
        muted = asyncio.Event()  # the client is not to hear the server's answer
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer, watch=muted)),
            asyncio.create_task(self._pipe(up_reader, writer, muted=muted)),
        ]
        self._tasks.update(pipes)
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for w in (writer, up_writer):
            self._live.discard(w)
            w.close()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        watch: asyncio.Event | None = None,
        muted: asyncio.Event | None = None,
    ) -> None:
        """Copy one direction. `watch` (client to server): mute the answer to
        the COMMIT that cut_answer_to_commit is after. `muted` (server to
        client): once set, the next answer is dropped and the connection cut."""
        marked = False
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if watch is not None and self._commit_marker is not None:
                    marked = marked or self._commit_marker in data
                    if marked and PG_COMMIT in data:
                        self._commit_marker = None  # once
                        watch.set()
                if muted is not None and muted.is_set():
                    # The server has answered the COMMIT: the transaction is
                    # stored, and the client never hears so.
                    self.commits_cut += 1
                    writer.transport.abort()
                    return  # and the server's side is closed
                writer.write(data)
                await writer.drain()

    def cut_answer_to_commit(self, marker: bytes) -> None:
        """On the first connection that sends `marker` (a statement's text),
        pass the next COMMIT on to PostgreSQL and cut that connection as soon
        as PostgreSQL answers it: the transaction is stored while its client
        is told the connection was lost. (asyncpg ends a transaction with a
        simple Query message, `COMMIT;`.)"""
        self._commit_marker = marker

    def cut(self) -> int:
        """Drop every live connection, both ways, as a network failure would."""
        cut = 0
        for w in list(self._live):
            transport = w.transport
            if not transport.is_closing():
                transport.abort()
                cut += 1
        self._live.clear()
        return cut

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
