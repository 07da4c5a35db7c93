"""tests/support/h2client.py against the real gRPC port: a raw HTTP/2 gRPC call gets its answer."""

from __future__ import annotations

from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import PingFrame
from pricestream.api.server import Server
from pricestream.v1 import pricestream_pb2 as pb
from support.h2client import H2Client, grpc_message, split_grpc_messages

SERVICE = "/pricestream.v1.PriceStreamService"


async def test_create_session_over_raw_h2(server: Server) -> None:
    settings = {SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20}
    async with await H2Client.connect("127.0.0.1", server.grpc_port, settings=settings) as client:
        request = pb.CreateSessionRequest(tickers=["AAPL", "MSFT"])
        stream_id = await client.send_grpc_request(
            f"{SERVICE}/CreateSession", request, timeout="5S"
        )
        result = await client.response(stream_id)
        assert result.reset is None
        assert dict(result.headers or [])[":status"] == "200"
        assert result.grpc_status == 0, result.grpc_message
        [body] = result.messages()
        session = pb.Session.FromString(body)
        assert session.session_id
        assert list(session.tickers) == ["AAPL", "MSFT"]
        assert client.settings_acks >= 1  # the server acknowledged our SETTINGS


async def test_unknown_method_is_unimplemented(server: Server) -> None:
    async with await H2Client.connect("127.0.0.1", server.grpc_port) as client:
        stream_id = await client.send_grpc_request(f"{SERVICE}/NoSuchMethod", b"")
        result = await client.response(stream_id)
        assert result.grpc_status == 12, result


async def test_ping_window_update_reset_and_raw_frames(server: Server) -> None:
    async with await H2Client.connect("127.0.0.1", server.grpc_port) as client:
        await client.ping(b"abcdefgh")
        await client.send_frame(PingFrame(0, b"rawframe"))  # written past h2
        await client.until(lambda: len(client.ping_acks) >= 2)
        assert client.ping_acks[:2] == [b"abcdefgh", b"rawframe"]

        await client.window_update(1 << 16)
        stream_id = await client.send_grpc_request(f"{SERVICE}/CreateSession", end_stream=False)
        await client.reset_stream(stream_id, ErrorCodes.CANCEL)
        assert client.streams[stream_id].reset == ErrorCodes.CANCEL
        # The connection lives on after the reset: a second call on it is answered.
        again = await client.send_grpc_request(
            f"{SERVICE}/CreateSession", pb.CreateSessionRequest(tickers=["KO"])
        )
        assert (await client.response(again)).grpc_status == 0
        assert client.goaway is None and not client.closed


def test_grpc_message_framing_round_trips() -> None:
    body = grpc_message(b"abc") + grpc_message(pb.CreateSessionRequest(tickers=["X"]))
    assert body[:5] == b"\x00\x00\x00\x00\x03"
    assert split_grpc_messages(body)[0] == b"abc"
    assert pb.CreateSessionRequest.FromString(split_grpc_messages(body)[1]).tickers == ["X"]
