"""Showing what a run's files say without trusting them: text as plain text, errors as messages.

Streamlit renders the text of ``st.error``, ``st.info``, ``st.caption`` and ``st.markdown`` as
Markdown, so a status message or a model name from a run's files could show images fetched from
anywhere, links or formatting. :func:`plain` escapes every Markdown character of such text; the
message functions here apply it. :func:`guarded` turns any error left over into a message, so
the page never shows a traceback.
"""

from __future__ import annotations

import functools
import html
import re
from collections.abc import Callable
from typing import Any, TypeVar

import streamlit as st

MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+!|<>~$:&])")
LINE_START = re.compile(r"(?m)^(\s*)([-=]|\d+\.)")  # a list, a heading's underline
F = TypeVar("F", bound=Callable[..., Any])


def plain(text: Any) -> str:
    """``text`` with every Markdown character escaped, so Streamlit shows it as it is: no image,
    link, HTML, emphasis, code, maths, colour or list (``plain("![x](u)")`` shows ``![x](u)``)."""
    escaped = MARKDOWN.sub(r"\\\1", str(text))
    return LINE_START.sub(lambda m: m.group(1) + re.sub(r"([-=.])", r"\\\1", m.group(2)), escaped)


def plain_title(text: Any) -> str:
    """``text`` for a plotly title or label (plotly reads a few HTML tags there)."""
    return html.escape(str(text), quote=False)


def error(text: Any, where: Any = st) -> None:
    where.error(plain(text))


def warning(text: Any, where: Any = st) -> None:
    where.warning(plain(text))


def info(text: Any, where: Any = st) -> None:
    where.info(plain(text))


def caption(text: Any, where: Any = st) -> None:
    where.caption(plain(text))


def guarded(what: str) -> Callable[[F], F]:
    """Run the decorated page part; an unexpected error shows as a message naming ``what``
    (Streamlit's own control flow, ``st.rerun`` and ``st.stop``, is no Exception and passes)."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except Exception as err:  # the README's promise: a message, never a traceback
                error(f"Cannot show {what}: {type(err).__name__}: {err}")
                return None

        return wrapper  # type: ignore[return-value]

    return decorate
