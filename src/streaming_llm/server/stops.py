"""Stop sequences (OpenAI's `stop`) over a reply's tokens, and the logprobs a client gets.

`StopMatcher` turns a reply's text pieces into the text a client may see: it holds back only a
tail that could still become a stop sequence, releases it as soon as it cannot, and when a stop
sequence completes (within one token or across several) the visible text ends just before it.
The earliest occurrence of any of the stop sequences wins, as with OpenAI.

`cut_at_stops` applies it to a `Token` iterator: each token comes out with the text to send now
(`Token.text` replaced). When a stop sequence fires, the inner reply is closed (it settles as an
early stop does), `on_stop(visible_text)` is called, which must make the session's stream hold
exactly what the client received (`sessions.Turn._cut`), and a last token with finish_reason
"stop" ends the iteration. `starts[i]` records where token i's own text began in the reply, so
logprobs are reported for exactly the tokens whose text the client got (`LogprobReport`): a
token entirely inside a cut stop sequence, or the model's end-of-turn token, is not reported.

`LogprobReport` formats `Token.logprob` / `Token.top_logprobs` in OpenAI's two shapes: chat
(`{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`) and the legacy
completions one (`{tokens, token_logprobs, top_logprobs, text_offset}`). Token strings are the
tokenizer's decoding of the single id (special tokens kept); `bytes` is that string in UTF-8
(a byte-level token that is part of a character decodes to U+FFFD).

What it does NOT do: run the model, touch a cache, or know about HTTP.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterator, Sequence

from ..core.engine import Token

MAX_STOPS = 4  # OpenAI's limit
MAX_TOP_LOGPROBS = 20  # chat
MAX_LEGACY_LOGPROBS = 5  # completions


class StopMatcher:
    """Text pieces in, the text safe to release out (see the module docstring)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""  # released later, or dropped if a stop sequence completes
        self.visible = ""  # everything released so far
        self.raw_len = 0  # characters of every piece added so far

    def add(self, piece: str) -> tuple[str, bool]:
        """-> (text to release now, whether a stop sequence fired). After a fire, `visible` is the
        whole visible reply and nothing more may be added."""
        self.raw_len += len(piece)
        buf = self.held + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.held = buf[: min(hits)], ""
            self.visible += out
            return out, True
        keep = self._open_tail(buf)
        out, self.held = buf[: len(buf) - keep], buf[len(buf) - keep :]
        self.visible += out
        return out, False

    def _open_tail(self, buf: str) -> int:
        """Length of the longest end of `buf` that is the start of a stop sequence."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self.held = self.held, ""
        self.visible += out
        return out


def cut_at_stops(tokens: Iterator[Token], stops: Sequence[str], on_stop: Callable[[str], None],
                 starts: list[int]) -> Iterator[Token]:
    """`tokens` with stop sequences applied (see the module docstring); `starts` is filled in."""
    m = StopMatcher(stops)
    try:
        for tok in tokens:
            starts.append(m.raw_len)
            text, fired = m.add(tok.text)
            if fired:
                tokens.close()  # the reply settles (chat: end-of-turn fed, partial reply recorded)
                on_stop(m.visible)
                yield replace(tok, text=text, finish_reason="stop")
                return
            if tok.finish_reason is not None:
                text += m.flush()
            yield replace(tok, text=text)
    except GeneratorExit:
        tokens.close()
        raise


class LogprobReport:
    """Which tokens' logprobs go with each piece of text sent, in OpenAI's shapes."""

    def __init__(self, tokenizer, starts: list[int]):
        self.tokenizer, self.starts = tokenizer, starts
        self.pending: list[Token] = []
        self.emitted = 0  # characters sent so far

    def add(self, tok: Token) -> list[Token]:
        """`tok` was received (its text about to be sent): the tokens to report with it."""
        if tok.logprob is not None:
            self.pending.append(tok)
        self.emitted += len(tok.text)
        ready = [t for t in self.pending if self.starts[t.index] < self.emitted]
        self.pending = [t for t in self.pending if self.starts[t.index] >= self.emitted]
        return ready

    def _str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def chat(self, toks: list[Token]) -> dict:
        def entry(i, lp):
            s = self._str(i)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        content = [dict(entry(t.id, t.logprob), top_logprobs=[entry(i, lp) for i, lp in t.top_logprobs or []])
                   for t in toks]
        return {"content": content, "refusal": None}

    def legacy(self, toks: list[Token]) -> dict:
        return {
            "tokens": [self._str(t.id) for t in toks],
            "token_logprobs": [t.logprob for t in toks],
            "top_logprobs": [{self._str(i): lp for i, lp in t.top_logprobs or []} for t in toks],
            "text_offset": [self.starts[t.index] for t in toks],  # within the completion's text
        }
