"""Stop-string matching in time linear in the text, whatever the stop strings are.

The detokenizer feeds generated text to a `StopMatcher` a piece at a time. It needs two answers:
the first stop string the text completes, and, while none has, how many characters at the end of
the text could still be the start of one (that text is held back from the stream, since a stop
string that completes later cuts it off).

Answering either by searching the recent text for each stop string costs O(number of stops x
longest stop) per token, and the hold-back question asked that way (try every prefix length of every
stop) costs O(number of stops x longest stop^2): 100 stop strings of 4,000 characters took seconds
per token. This module builds an Aho-Corasick automaton over the stop strings once, then reads each
new character once: its state is the longest end of the text that is a prefix of some stop string,
which is exactly the hold-back length, and a state that ends a stop string is a match. Reading a
character costs O(1) amortized (each failure link taken shortens the state, and the state grows by
at most one per character), so a request costs O(output characters + total stop characters).

Of several stop strings that match, the one that completes first wins, and of those ending at the
same character the longest (the one that started earliest), as if text arrived one character at
a time. Automata are cached by stop list, so the same list sent again costs nothing to build.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class _Automaton:
    children: tuple[dict[str, int], ...]   # trie edges per state; state 0 is the empty prefix
    fail: tuple[int, ...]                  # the longest proper suffix of a state that is a state
    depth: tuple[int, ...]                 # length of the prefix a state stands for
    match: tuple[str | None, ...]          # the longest stop string ending at a state, or None


@functools.lru_cache(maxsize=256)
def _build(stops: tuple[str, ...]) -> _Automaton:
    children: list[dict[str, int]] = [{}]
    depth = [0]
    ends: list[str | None] = [None]
    for stop in stops:
        state = 0
        for char in stop:
            nxt = children[state].get(char)
            if nxt is None:
                nxt = len(children)
                children[state][char] = nxt
                children.append({})
                depth.append(depth[state] + 1)
                ends.append(None)
            state = nxt
        ends[state] = stop
    fail = [0] * len(children)
    match = list(ends)
    queue = deque(children[0].values())
    while queue:  # breadth first: failure targets are shallower, so already complete
        state = queue.popleft()
        if match[state] is None:
            match[state] = match[fail[state]]
        for char, child in children[state].items():
            fail[child] = _goto(children, fail, fail[state], char) if state else 0
            queue.append(child)
    return _Automaton(tuple(children), tuple(fail), tuple(depth), tuple(match))


def _goto(children: Sequence[dict[str, int]], fail: Sequence[int], state: int, char: str) -> int:
    """The state after reading `char` in `state`: follow failure links until an edge fits."""
    while True:
        nxt = children[state].get(char)
        if nxt is not None:
            return nxt
        if state == 0:
            return 0
        state = fail[state]


def prepare_stop_matcher(stops: Sequence[str]) -> None:
    """Build (and cache) the automaton for `stops` now, so that a `StopMatcher` made later for the
    same list, on a thread where time matters more, finds it ready."""
    _build(tuple(stops))


class StopMatcher:
    """Streams text through the stop strings' automaton; see the module docstring."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._automaton = _build(tuple(stops))
        self._state = 0
        self.num_chars_scanned = 0   # every character read, for tests of the linear bound

    @property
    def num_chars_to_hold(self) -> int:
        """Length of the longest end of the text read so far that begins some stop string."""
        return self._automaton.depth[self._state]

    def feed(self, text: str) -> tuple[str, int] | None:
        """Read `text`; returns (stop string, where it starts relative to `text`: negative when it
        began in earlier text) for the first stop it completes, else None. After a match the
        matcher must not be fed again."""
        automaton = self._automaton
        children, fail, match = automaton.children, automaton.fail, automaton.match
        state = self._state
        for index, char in enumerate(text):
            state = _goto(children, fail, state, char)
            stop = match[state]
            if stop is not None:
                self._state = state
                self.num_chars_scanned += index + 1
                return stop, index + 1 - len(stop)
        self._state = state
        self.num_chars_scanned += len(text)
        return None
