"""HTML rendering helpers. Every piece of user or corpus text is escaped here before display."""

from __future__ import annotations

import html


def escape(text: str) -> str:
    return html.escape(text or "", quote=True)


def hit_card(rank: int, title: str, score: float, snippet: str, shared: bool, shift: int | None) -> str:
    badge = ""
    if shared:
        moved = "" if shift in (None, 0) else (f" ↑{-shift}" if shift < 0 else f" ↓{shift}")
        badge = f'<span class="lens-shared" title="retrieved by both models">both{escape(moved)}</span>'
    return (
        f'<div class="lens-hit"><div class="lens-hit-head"><b>{rank}.</b> {escape(title)} '
        f'<span class="lens-score">{score:.4f}</span> {badge}</div>'
        f'<div class="lens-snippet">{escape(snippet)}</div></div>'
    )


STYLE = """
<style>
.lens-hit {padding: 0.35rem 0.5rem; margin-bottom: 0.35rem; border-left: 3px solid #ccc;}
.lens-hit-head {font-size: 0.95rem;}
.lens-score {font-family: monospace; color: #555; margin-left: 0.4rem;}
.lens-shared {background: #e3f2e1; color: #1b5e20; border-radius: 0.3rem; padding: 0 0.3rem;
              font-size: 0.8rem; margin-left: 0.3rem;}
.lens-snippet {font-size: 0.85rem; color: #444;}
</style>
"""
