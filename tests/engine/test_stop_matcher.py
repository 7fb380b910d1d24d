"""Stop-string matching reads each output character once, whatever the stop strings: exact matches
against a brute-force reference, and the count of characters scanned for 100 stop strings of 4,000
characters (which took seconds per token when matching was quadratic)."""

from __future__ import annotations

import random
import time

import pytest

from tandem.engine.detokenizer import IncrementalDetokenizer
from tandem.engine.stop_matcher import StopMatcher
from tandem.engine.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def reference(text: str, stops: list[str]) -> tuple[str, int] | None:
    """(stop, start) of the first stop to complete, longest of those ending together."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return stop, end - len(stop)
    return None


def reference_hold(text: str, stops: list[str]) -> int:
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def test_matches_and_hold_back_equal_brute_force_on_random_text():
    rng = random.Random(7)
    for _ in range(300):
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 5)))
                 for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        matcher, fed, found = StopMatcher(stops), "", None
        for piece in [text[i:i + 3] for i in range(0, len(text), 3)]:
            found = matcher.feed(piece)
            if found is not None:
                found = (found[0], len(fed) + found[1])
                break
            fed += piece
            assert matcher.num_chars_to_hold == reference_hold(fed, stops), (stops, fed)
        assert found == reference(text, stops), (stops, text)


def test_the_first_stop_to_complete_wins_and_ties_go_to_the_longest():
    assert StopMatcher(["bcd", "abcde"]).feed("xabcdef") == ("bcd", 2)
    assert StopMatcher(["cd", "bcd"]).feed("abcd") == ("bcd", 1)
    matcher = StopMatcher(["needle"])
    assert matcher.feed("a nee") is None and matcher.num_chars_to_hold == 3
    assert matcher.feed("dle!") == ("needle", -3)   # started 3 characters before this piece


def test_many_long_stop_strings_are_scanned_once_per_output_character(tokenizer):
    rng = random.Random(0)
    # Stop strings that share long prefixes with the output: the worst case of the old matcher.
    stops = ["ab" * 1999 + rng.choice("xyz") + str(i) for i in range(100)]
    output_ids = tokenizer.encode("ab" * 1500 + " done")
    detokenizer = IncrementalDetokenizer(tokenizer, [5], stops)
    started = time.perf_counter()
    streamed = ""
    for token_id in output_ids:
        assert detokenizer.add_tokens([token_id]) is None
        streamed += detokenizer.get_text_delta(finished=False)
    elapsed_s = time.perf_counter() - started
    streamed += detokenizer.get_text_delta(finished=True)
    assert streamed == "ab" * 1500 + " done"
    assert detokenizer.num_stop_chars_scanned == len(streamed)
    assert elapsed_s < 1.0, f"{len(output_ids)} tokens took {elapsed_s:.2f} s"


def test_held_text_is_the_longest_possible_stop_start(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer, [5], ["ab" * 2000])
    detokenizer.add_tokens(tokenizer.encode("zz" + "ab" * 100))
    assert detokenizer.get_text_delta(finished=False) == "zz"   # 200 characters may begin the stop
    detokenizer.add_tokens(tokenizer.encode("q"))
    assert detokenizer.get_text_delta(finished=False) == "ab" * 100 + "q"
