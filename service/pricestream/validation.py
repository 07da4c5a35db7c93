"""Validation of client input: ticker symbols and session ids."""

from __future__ import annotations

import re

from pricestream.errors import invalid_argument

MAX_TICKER_LENGTH = 16
# Upper-case letters and digits, with '.', '-' or '_' inside (BRK.B, BF-B); nothing else.
_TICKER = re.compile(r"[A-Z0-9](?:[A-Z0-9._-]{0,14}[A-Z0-9])?")
# Session ids are 22 url-safe base64 characters (128 random bits).
SESSION_ID_LENGTH = 22
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{22}")


def normalise_ticker(raw: str) -> str:
    """Return the canonical (upper-case) form of one ticker, or raise INVALID_ARGUMENT."""
    if not raw:
        raise invalid_argument("ticker must not be empty")
    if len(raw) > MAX_TICKER_LENGTH:
        raise invalid_argument(
            f"ticker {raw[:MAX_TICKER_LENGTH]!r}... is longer than {MAX_TICKER_LENGTH} characters"
        )
    # ASCII first: str.upper maps some other letters to ASCII ones ('ß' -> 'SS').
    ticker = raw.upper() if raw.isascii() else raw
    if not _TICKER.fullmatch(ticker):
        raise invalid_argument(
            f"ticker {raw!r} is invalid: use A-Z, 0-9 and inner '.', '-' or '_' only"
        )
    return ticker


def normalise_tickers(raw: list[str], limit: int) -> list[str]:
    """Upper-case, validate and deduplicate tickers (first occurrence order), within ``limit``."""
    if not raw:
        raise invalid_argument("at least one ticker is required")
    if len(raw) > 10 * limit:
        raise invalid_argument(f"too many tickers: {len(raw)} given, at most {limit} allowed")
    tickers = list(dict.fromkeys(normalise_ticker(item) for item in raw))
    if len(tickers) > limit:
        raise invalid_argument(f"too many tickers: {len(tickers)} given, at most {limit} allowed")
    return tickers


def check_session_id(session_id: str) -> str:
    """Return the id if it is well formed, else raise INVALID_ARGUMENT."""
    if not session_id:
        raise invalid_argument("session_id is required")
    if not _SESSION_ID.fullmatch(session_id):
        raise invalid_argument(
            f"session_id is malformed: expected {SESSION_ID_LENGTH} url-safe characters"
        )
    return session_id
