"""Stop strings over streamed text: whatever the chunking, the emitted text is the text up to
the first stop string, and nothing after it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxmoe.serving.stopping import StopMatcher, normalize_stop


def run(chunks, stops):
    m = StopMatcher(stops)
    out = [m.feed(c) for c in chunks]
    out.append(m.flush())
    return "".join(out), m.stopped


def expected(text, stops):
    """Feed one character at a time; stop at the first stop string to complete."""
    for end in range(len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[: end - max(map(len, done))], True
    return text, False


alphabet = st.sampled_from("ab\n é")


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet, max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=8),
    stops=st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=3),
)
def test_stream_equals_text_up_to_first_stop(text, cuts, stops):
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert run(chunks, stops) == expected(text, stops)


def test_holds_back_a_possible_stop_prefix_then_releases_it():
    m = StopMatcher(["</s>"])
    assert m.feed("hello </") == "hello "
    assert m.feed("b>") == "</b>"
    assert m.feed(" bye</s> tail") == " bye"
    assert m.stopped and m.feed("more") == "" and m.flush() == ""


def test_first_completed_stop_wins():
    assert run(["xx STOP yy END"], ["END", "STOP"]) == ("xx ", True)
    assert run(["abcd"], ["bc", "abcd"]) == ("a", True)  # "bc" completes before "abcd"


def test_normalize_stop():
    assert normalize_stop(None) == ()
    assert normalize_stop("x") == ("x",)
    assert normalize_stop(["a", "bc"]) == ("a", "bc")
    with pytest.raises(ValueError, match="non-empty"):
        normalize_stop([""])
    with pytest.raises(ValueError, match="stop"):
        normalize_stop([3])
