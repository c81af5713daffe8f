"""Http11 against small servers that answer as a node would not:
every malformed or cut-short answer is a StorageError, and a connection is
kept only when the answer allows it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import pytest
import trio

from chunkfs import errors
from chunkfs.errors import StorageError
from chunkfs.nodeclient import Http11

Answer = Callable[[trio.SocketStream], Awaitable[None]]


async def serve(answer: Answer, task_status: trio.TaskStatus[int]) -> None:
    """Accept connections on a free loopback port; each request gets ``answer``."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(trio.ClosedResourceError):  # the answer closed it
                while True:
                    request = b""
                    while b"\r\n\r\n" not in request:
                        got = await stream.receive_some(65536)
                        if not got:
                            return
                        request += got
                    await answer(stream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def get_from(answer: Answer, times: int = 1) -> list[bytes]:
    with errors.unwrapped():
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve, answer)
            http = Http11(f"http://127.0.0.1:{port}", timeout=5)
            try:
                return [bytes((await http.request("GET", "/x", {})).body) for _ in range(times)]
            finally:
                await http.aclose()
                nursery.cancel_scope.cancel()


def replying(*parts: bytes, close: bool = False) -> Answer:
    async def answer(stream: trio.SocketStream) -> None:
        for part in parts:
            await stream.send_all(part)
        if close:
            await stream.aclose()

    return answer


async def test_a_body_in_pieces_and_a_kept_connection() -> None:
    opened = 0

    async def answer(stream: trio.SocketStream) -> None:
        nonlocal opened
        opened += id(stream) not in seen
        seen.add(id(stream))
        await stream.send_all(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\n\r\n0123")
        await trio.sleep(0.01)
        await stream.send_all(b"456789")

    seen: set[int] = set()
    assert await get_from(answer, times=3) == [b"0123456789"] * 3
    assert opened == 1


async def test_connection_close_is_honoured() -> None:
    answer = replying(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", close=True
    )
    assert await get_from(answer, times=2) == [b"ok", b"ok"]


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        (
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",),
            "Content-Length",
        ),
        ((b"SPDY 200 OK\r\nContent-Length: 2\r\n\r\nok",), "malformed status line"),
        ((b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 2\r\n\r\nok",), "malformed header"),
        ((b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",), "closed mid-answer"),
        ((b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"x" * 20000 + b"\r\n\r\n",), "head over"),
    ],
)
async def test_a_malformed_or_cut_answer_is_a_storage_error(
    parts: tuple[bytes, ...], message: str
) -> None:
    with pytest.raises(StorageError, match=message):
        await get_from(replying(*parts, close=True))


async def test_a_silent_node_times_out() -> None:
    async def answer(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    with errors.unwrapped():
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve, answer)
            http = Http11(f"http://127.0.0.1:{port}", timeout=0.3)
            with pytest.raises(StorageError, match="timed out"):
                await http.request("GET", "/x", {})
            nursery.cancel_scope.cancel()


async def echo(stream: trio.SocketStream, *, close: bool) -> None:
    """Answer each request with its own body; with ``close``, drop the
    connection after the first answer without saying so beforehand.
    """
    async with stream:
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                got = await stream.receive_some(65536)
                if not got:
                    return
                data += got
            head, _, data = data.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(data) < length:
                data += await stream.receive_some(65536)
            body, data = data[:length], data[length:]
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length + body)
            if close:
                return


@pytest.mark.parametrize("size", [0, 4096, 3 << 20])
async def test_a_body_goes_out_whole_and_a_closed_kept_connection_is_replaced(size: int) -> None:
    body = bytes(range(256)) * (size // 256)
    with errors.unwrapped():
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, lambda s: echo(s, close=True), listeners)
            http = Http11(f"http://127.0.0.1:{port}", timeout=5)
            try:
                for _ in range(3):  # the 2nd and 3rd meet the connection the node closed
                    answer = await http.request("POST", "/x", {}, body)
                    assert (answer.status, bytes(answer.body)) == (200, body)
                    await trio.sleep(0.05)  # the close has reached this side
            finally:
                await http.aclose()
                nursery.cancel_scope.cancel()
