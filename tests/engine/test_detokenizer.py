"""IncrementalDetokenizer: deltas add up to the full decode, partial characters and possible stop
strings are held back, and stop strings cut the text exactly."""

from __future__ import annotations

import random

import pytest

from tandem.engine.detokenizer import IncrementalDetokenizer
from tandem.engine.tokenizer import BUILTIN_EOS_TOKEN_ID, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def stream(detok: IncrementalDetokenizer, token_ids: list[int], chunk_sizes: list[int] | None = None) -> list[str]:
    """Feed `token_ids` in chunks (one token each by default), collecting a delta after each chunk."""
    deltas = []
    start = 0
    sizes = iter(chunk_sizes or [])
    while start < len(token_ids):
        size = next(sizes, 1)
        stop = detok.add_tokens(token_ids[start:start + size])
        start += size
        deltas.append(detok.get_text_delta(finished=False))
        if stop is not None:
            break
    deltas.append(detok.get_text_delta(finished=True))
    return deltas


def first_stop_cut(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Reference: reveal `text` one character at a time and cut at the first stop string to complete."""
    for end in range(1, len(text) + 1):
        matches = [s for s in stops if text[:end].endswith(s)]
        if matches:
            stop = max(matches, key=len)  # completing together: the longer one starts earlier
            return (text[:end] if include else text[:end - len(stop)]), stop
    return text, None


# --- deltas add up to the full decode -------------------------------------------------------------


def test_random_token_sequences_match_full_decode(tokenizer):
    rng = random.Random(1234)
    vocab_size = len(tokenizer)
    for _ in range(300):
        prompt = [rng.randrange(vocab_size) for _ in range(rng.randrange(0, 12))]
        output = [rng.randrange(vocab_size) for _ in range(rng.randrange(1, 60))]
        skip = rng.random() < 0.5
        chunks = [rng.choice([1, 1, 1, 2, 5]) for _ in output]
        detok = IncrementalDetokenizer(tokenizer, prompt, [], skip_special_tokens=skip)
        deltas = stream(detok, output, chunks)
        expected = tokenizer.decode(output, skip_special_tokens=skip)
        assert "".join(deltas) == expected
        assert detok.output_text == expected


@pytest.mark.parametrize("text", [
    "Hello, world! The keeper climbed the stairs.",
    "naïve café, Zürich, São Paulo, Ελληνικά, русский, 日本語のテキスト",
    "def f(x: int) -> int:\n    return x ** 2  # squared\n",
    "I ❤️ 🙂👍🏽 and 👨‍👩‍👧 together 🎉",
])
def test_natural_text_streams_back_exactly_without_replacement_chars(tokenizer, text):
    prompt = tokenizer.encode("Say something:")
    detok = IncrementalDetokenizer(tokenizer, prompt, [])
    deltas = stream(detok, tokenizer.encode(text))
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)


def test_emoji_split_over_byte_tokens_is_held_until_complete(tokenizer):
    emoji_ids = tokenizer.encode("🙂")
    assert len(emoji_ids) == 4  # one token per UTF-8 byte: the case this test is about
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("ok"), [])
    deltas = []
    for token_id in emoji_ids:
        assert detok.add_tokens([token_id]) is None
        deltas.append(detok.get_text_delta(finished=False))
    assert deltas == ["", "", "", "🙂"]
    assert detok.get_text_delta(finished=True) == ""


def test_emoji_right_after_a_prompt_that_ends_mid_character(tokenizer):
    # The prompt ends with the first two bytes of an emoji: its window context is dropped, and the
    # output decodes exactly as tokenizer.decode(output) would.
    emoji_ids = tokenizer.encode("🙂")
    prompt = tokenizer.encode("hi ") + emoji_ids[:2]
    output = emoji_ids[2:] + tokenizer.encode(" there") + emoji_ids
    detok = IncrementalDetokenizer(tokenizer, prompt, [])
    assert "".join(stream(detok, output)) == tokenizer.decode(output)


def test_invalid_bytes_are_held_while_unfinished_and_flushed_on_finish(tokenizer):
    lead_byte = tokenizer.encode("🙂")[0]  # a UTF-8 lead byte that nothing completes
    detok = IncrementalDetokenizer(tokenizer, [], [])
    detok.add_tokens(tokenizer.encode("abc") + [lead_byte])
    assert detok.get_text_delta(finished=False) == ""
    assert detok.get_text_delta(finished=True) == "abc\ufffd"
    assert detok.output_text == tokenizer.decode(tokenizer.encode("abc") + [lead_byte]) == "abc\ufffd"


def test_invalid_byte_is_emitted_once_a_character_follows(tokenizer):
    lead_byte = tokenizer.encode("🙂")[0]
    detok = IncrementalDetokenizer(tokenizer, [], [])
    detok.add_tokens([lead_byte])
    assert detok.get_text_delta(finished=False) == ""
    detok.add_tokens(tokenizer.encode("x"))
    assert detok.get_text_delta(finished=False) == "\ufffdx"


def test_special_tokens_skipped_or_kept(tokenizer):
    output = tokenizer.encode("one") + [BUILTIN_EOS_TOKEN_ID] + tokenizer.encode(" two")
    skipped = IncrementalDetokenizer(tokenizer, [], [], skip_special_tokens=True)
    kept = IncrementalDetokenizer(tokenizer, [], [], skip_special_tokens=False)
    assert "".join(stream(skipped, output)) == "one two"
    assert "".join(stream(kept, output)) == "one<|eos|> two"


def test_decode_window_stays_small(tokenizer):
    class RecordingTokenizer:
        def __init__(self, inner):
            self.inner = inner
            self.window_sizes: list[int] = []

        def decode(self, token_ids, **kwargs):
            self.window_sizes.append(len(token_ids))
            return self.inner.decode(token_ids, **kwargs)

    recording = RecordingTokenizer(tokenizer)
    text = "The lighthouse keeper woke before the sun, as he had every morning. " * 20 + "🙂👍🏽" * 5
    output = tokenizer.encode(text)
    detok = IncrementalDetokenizer(recording, tokenizer.encode("prompt " * 50), [])
    assert "".join(stream(detok, output)) == text
    assert len(output) > 300
    assert max(recording.window_sizes) <= 12


# --- stop strings ---------------------------------------------------------------------------------


def test_stop_string_in_the_middle(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], ["France"])
    deltas = stream(detok, tokenizer.encode("The capital of France is Paris."))
    assert "".join(deltas) == detok.output_text == "The capital of "
    assert detok.matched_stop == "France"


def test_stop_string_at_the_start(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], ["Hello"])
    assert detok.add_tokens(tokenizer.encode("Hello world")) == "Hello"
    assert detok.get_text_delta(finished=False) == ""
    assert detok.get_text_delta(finished=True) == ""
    assert detok.output_text == ""


def test_stop_string_at_the_start_included(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], ["Hello"], include_stop_str_in_output=True)
    assert detok.add_tokens(tokenizer.encode("Hello world")) == "Hello"
    assert detok.get_text_delta(finished=False) == "Hello"
    assert detok.output_text == "Hello"


def test_stop_string_spanning_token_boundaries(tokenizer):
    text = "The capital of France is Paris."
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces[3:5] == [" France", " is"]
    stop = "nce i"  # the end of one token and the start of the next
    detok = IncrementalDetokenizer(tokenizer, [], [stop])
    results = [detok.add_tokens([i]) for i in ids[:5]]
    assert results == [None, None, None, None, stop]  # completes exactly with the token " is"
    assert detok.get_text_delta(finished=True) == "The capital of Fra"


def test_stop_string_spanning_an_emoji_split_into_bytes(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], ["🙂 d"])
    deltas = stream(detok, tokenizer.encode("ok 🙂 done"))
    assert "".join(deltas) == "ok "
    assert not any("\ufffd" in delta for delta in deltas)


def test_include_stop_str_cuts_after_the_stop_string(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], ["Paris"], include_stop_str_in_output=True)
    # All tokens in one call: the text after the stop string arrives together with it and is dropped.
    assert detok.add_tokens(tokenizer.encode("The capital of France is Paris. Next")) == "Paris"
    assert detok.get_text_delta(finished=True) == "The capital of France is Paris"


def test_earliest_of_several_stop_strings_wins(tokenizer):
    ids = tokenizer.encode("Hello world, hello moon")
    for stops in (["world", "lo"], ["lo", "world"]):
        detok = IncrementalDetokenizer(tokenizer, [], stops)
        assert detok.add_tokens(ids) == "lo"
        assert detok.get_text_delta(finished=True) == "Hel"


def test_overlapping_stop_strings_cut_at_the_first_to_complete(tokenizer):
    ids = tokenizer.encode("xabcdy")
    for stops in (["abcd", "bc"], ["bc", "abcd"]):
        detok = IncrementalDetokenizer(tokenizer, [], stops)
        assert "".join(stream(detok, ids)) == "xa"
        assert detok.matched_stop == "bc"


def test_stop_string_in_the_prompt_does_not_stop_the_output(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Tell me about France"), ["France"])
    assert "".join(stream(detok, tokenizer.encode(" and Spain."))) == " and Spain."
    assert detok.matched_stop is None


def test_no_tokens_accepted_after_a_stop(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], ["wor"])
    assert detok.add_tokens(tokenizer.encode("Hello world")) == "wor"
    with pytest.raises(ValueError, match="already stopped"):
        detok.add_tokens(tokenizer.encode("more"))


def test_possible_stop_start_is_held_back_then_released_on_finish(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], ["</answer>"])
    detok.add_tokens(tokenizer.encode("the end </ans"))
    assert detok.get_text_delta(finished=False) == "the end "
    assert detok.get_text_delta(finished=True) == "</ans"
    assert detok.output_text == "the end </ans"
    assert detok.matched_stop is None


def test_held_back_text_is_released_when_it_turns_out_not_to_be_a_stop(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], ["</answer>"])
    detok.add_tokens(tokenizer.encode("a </ans"))
    assert detok.get_text_delta(finished=False) == "a "
    detok.add_tokens(tokenizer.encode("wer> b"))
    assert detok.get_text_delta(finished=False) == ""  # the stop string matched: nothing new to send
    assert detok.matched_stop == "</answer>"
    detok2 = IncrementalDetokenizer(tokenizer, [], ["</answer>"])
    detok2.add_tokens(tokenizer.encode("a </ans"))
    assert detok2.get_text_delta(finished=False) == "a "
    detok2.add_tokens(tokenizer.encode("wers are"))
    assert detok2.get_text_delta(finished=False) == "</answers are"


def test_only_a_possible_stop_prefix_is_held_back(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], ["<stop>", "\n\n"])
    detok.add_tokens(tokenizer.encode("line one\nline two <"))
    # "<" may start "<stop>"; "\n" earlier in the text is followed by more text, so it is not held.
    assert detok.get_text_delta(finished=False) == "line one\nline two "
    detok.add_tokens(tokenizer.encode(" and three"))
    assert detok.get_text_delta(finished=False) == "< and three"


def test_nothing_is_held_back_when_the_stop_string_is_included(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], ["</answer>"], include_stop_str_in_output=True)
    detok.add_tokens(tokenizer.encode("the end </ans"))
    assert detok.get_text_delta(finished=False) == "the end </ans"
    assert detok.add_tokens(tokenizer.encode("wer> trailing")) == "</answer>"
    assert detok.get_text_delta(finished=False) == "wer>"


@pytest.mark.parametrize("include", [False, True])
def test_random_stop_strings_match_reference(tokenizer, include):
    rng = random.Random(99 + include)
    corpus = (
        "The keeper lit the lamp. Three boats came home by his light! "
        "Prefill is compute bound; decode is memory bound. 🙂 naïve café 日本語. "
        "def f(x):\n    return x + 1\n\n"
    )
    for _ in range(200):
        start = rng.randrange(len(corpus) - 40)
        text = corpus[start:start + rng.randrange(10, 40)]
        stops = []
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(text))
            stops.append(text[at:at + rng.randrange(1, 6)])
        if rng.random() < 0.3:
            stops.append("never appears")
        ids = tokenizer.encode(text)
        chunks = [rng.choice([1, 1, 2, 3]) for _ in ids]
        detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("prompt"), stops, include_stop_str_in_output=include)
        deltas = stream(detok, ids, chunks)
        expected_text, expected_stop = first_stop_cut(text, stops, include)
        assert "".join(deltas) == detok.output_text == expected_text, (text, stops)
        assert detok.matched_stop == expected_stop


def test_invalid_stop_arguments_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tokenizer, [], ["ok", ""])
    with pytest.raises(ValueError, match="list of strings"):
        IncrementalDetokenizer(tokenizer, [], "stop")


def test_stop_strings_wait_for_min_tokens(tokenizer):
    ids = tokenizer.encode("ab ab ab", add_special_tokens=False)   # ab, " a", b, " a", b
    early = IncrementalDetokenizer(tokenizer, [], ["ab"])
    assert early.add_tokens(ids[:1]) == "ab" and early.output_text == ""
    held = IncrementalDetokenizer(tokenizer, [], ["ab"], min_tokens=4)
    # The matches at tokens 1 and 3 come before min_tokens; the one at token 5 ends the output.
    assert [held.add_tokens([t]) for t in ids] == [None, None, None, None, "ab"]
    assert held.output_text == "ab ab "
