from capture.sse import EventSplitter, event_data, iter_data


def test_an_event_split_across_chunks_is_released_whole_once_its_end_arrives() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b'data: {"a":') == []
    assert splitter.feed(b"1}\n\ndata: [DO") == [b'data: {"a":1}\n\n']
    assert splitter.feed(b"NE]\n\n") == [b"data: [DONE]\n\n"]
    assert splitter.rest() == b""


def test_crlf_terminated_events_keep_their_exact_bytes() -> None:
    splitter = EventSplitter()
    assert splitter.feed(b"data: x\r\n\r\ndata: y\n\n") == [b"data: x\r\n\r\n", b"data: y\n\n"]


def test_multi_line_data_is_joined_with_newlines_and_comments_have_no_data() -> None:
    assert event_data(b"data: a\ndata: b\n\n") == b"a\nb"
    assert event_data(b"data:no-space\n\n") == b"no-space"
    assert event_data(b": keep-alive\n\n") is None
    assert event_data(b"event: ping\n\n") is None


def test_a_stream_cut_mid_event_still_yields_the_complete_events_and_the_tail() -> None:
    chunks = [b"data: 1\n\nda", b"ta: 2\n\ndata: 3"]
    assert list(iter_data(chunks)) == [b"1", b"2", b"3"]
