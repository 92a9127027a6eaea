"""The text state machine that turns the model's per-frame action into text tokens.

At each frame the backbone predicts an action: *new word* or *pad*. The machine
keeps the parsed script as a queue of word entries and decides which text token
(main stream) and which look-ahead token (second stream) the model sees next.
The semantics are the reference's, quirks included: its padding budget is a
fixed 6 frames per word (``REFERENCE_MAX_PADDING``), not the config's ``max_pad``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# nari-labs/dia2 builds its StateMachine with max_padding=6 whatever config.json says.
REFERENCE_MAX_PADDING = 6


@dataclass(frozen=True)
class TokenIds:
    new_word: int
    pad: int
    bos: int
    zero: int
    spk1: int
    spk2: int
    audio_pad: int
    audio_bos: int


@dataclass
class Entry:
    """One word of the script (``tokens``) or a silence (no tokens, only ``padding``)."""

    tokens: list[int]
    text: str
    padding: int = 0


@dataclass
class TextState:
    entries: deque[Entry]
    padding_budget: int
    forced_padding: int
    pending: deque[int] = field(default_factory=deque)
    lookahead: deque[int] = field(default_factory=deque)
    end_step: int | None = None
    transcript: list[tuple[str, int]] = field(default_factory=list)

    def upcoming_tokens(self, count: int) -> list[int]:
        """Tokens of the ``count``-th upcoming word (silences skipped), for the second stream."""
        for entry in self.entries:
            if entry.tokens:
                count -= 1
                if count == 0:
                    return entry.tokens
        return []


class StateMachine:
    def __init__(self, ids: TokenIds, *, second_stream_ahead: int, initial_padding: int,
                 max_padding: int = REFERENCE_MAX_PADDING) -> None:
        self.ids = ids
        self.second_stream_ahead = second_stream_ahead
        self.initial_padding = initial_padding
        self.max_padding = max_padding

    def new_state(self, entries: list[Entry]) -> TextState:
        return TextState(deque(entries), self.initial_padding, self.initial_padding)

    def process(self, step: int, state: TextState, action: int, forced: bool = False) -> tuple[int, int]:
        """Consume the sampled action for ``step``; return (main token, second token)."""
        token = self._constrain(state, self._action_token(action), forced)
        token = self._maybe_take_word(step, state, token)
        main = self._emit_main(state, token)
        return self._multiplex_second(state, main)

    def takes_entry(self, state: TextState, action: int) -> bool:
        """Whether ``process`` with this action would take the next script entry (or mark the end).

        A streaming caller asks this before ``process`` to wait for more text
        rather than let the machine see an exhausted script.
        """
        return self._constrain(state, self._action_token(action), False) == self.ids.new_word

    def _action_token(self, action: int) -> int:
        # Action ids 1/0 map onto the text new-word/pad tokens; anything else is a pad.
        if action == 1:
            return self.ids.new_word
        if action == 0:
            return self.ids.pad
        return action if action in (self.ids.new_word, self.ids.pad) else self.ids.pad

    def _constrain(self, state: TextState, token: int, forced: bool) -> int:
        if state.pending:
            return self.ids.pad  # still spelling out the current word
        if forced:
            return token
        if state.forced_padding > 0:
            return self.ids.pad
        if state.padding_budget <= 0:
            return self.ids.new_word  # waited long enough: next word now
        return token

    def _maybe_take_word(self, step: int, state: TextState, token: int) -> int:
        if token != self.ids.new_word:
            return token
        if state.entries:
            entry = state.entries.popleft()
            if entry.tokens:
                state.transcript.append((entry.text, step))
                state.pending.extend(entry.tokens)
                if self.second_stream_ahead:
                    state.lookahead.extend(state.upcoming_tokens(self.second_stream_ahead))
                state.padding_budget = self.max_padding
            else:
                token = self.ids.pad  # a silence entry
            state.forced_padding = entry.padding
            return token
        # Script exhausted: mark the end; with a second stream the first end frame is a new word.
        if state.end_step is None:
            state.end_step = step
            return self.ids.new_word if self.second_stream_ahead else self.ids.pad
        return self.ids.pad

    def _emit_main(self, state: TextState, token: int) -> int:
        if token == self.ids.pad:
            if state.padding_budget > 0:
                state.padding_budget -= 1
            if state.forced_padding > 0:
                state.forced_padding -= 1
            return state.pending.popleft() if state.pending else self.ids.pad
        return token

    def _multiplex_second(self, state: TextState, main: int) -> tuple[int, int]:
        if not self.second_stream_ahead:
            return main, main
        if main == self.ids.new_word:
            return (state.pending.popleft() if state.pending else self.ids.pad), self.ids.new_word
        return main, (state.lookahead.popleft() if state.lookahead else self.ids.pad)
