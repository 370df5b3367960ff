"""Chat-template rendering that survives templates refusing a message form it can rewrite.

Some templates raise on conversations they could still express: Llama-3.2-Vision's refuses a system message
when images are present, while TRL's VLM GRPO example adds one. ``apply_template`` then folds the system text
into the first user turn (the only rewrite it makes), warns once per template, and renders that instead.
"""

from __future__ import annotations

import warnings
from typing import Any

from ..errors import VLRMError

_WARNED: set[int] = set()  # hashes of the templates already warned about


class ChatTemplateError(VLRMError, ValueError):
    """A chat template that refuses a conversation even after the rewrites ``apply_template`` knows."""


def fold_system(messages: list[dict]) -> list[dict] | None:
    """The conversation with every system message's text prepended to the first user turn (None: no system)."""
    system = [m for m in messages if m.get("role") == "system"]
    if not system:
        return None
    text = "\n\n".join(_text(m["content"]) for m in system)
    rest = [m for m in messages if m.get("role") != "system"]
    i = next((j for j, m in enumerate(rest) if m.get("role") == "user"), None)
    if i is None:
        return [{"role": "user", "content": text}, *rest]
    user = rest[i]
    content = user["content"]
    if isinstance(content, str):
        content = f"{text}\n\n{content}" if content else text
    else:
        blocks = [dict(b) for b in content]
        first = next((b for b in blocks if b.get("type") == "text"), None)
        if first is None:
            blocks.append({"type": "text", "text": text})
        else:
            first["text"] = f"{text}\n\n{first['text']}" if first.get("text") else text
        content = blocks
    return [*rest[:i], {**user, "content": content}, *rest[i + 1:]]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(b.get("text", "") for b in content if b.get("type") == "text")


def apply_template(owner, messages: list[dict], **kwargs: Any) -> str:
    """``owner.apply_chat_template(messages, tokenize=False, **kwargs)``; when the template raises and the
    conversation has a system message, the system text is folded into the first user turn (warned once)."""
    from jinja2.exceptions import TemplateError

    try:
        return owner.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as e:
        folded = fold_system(messages)
        if folded is None:
            raise ChatTemplateError(f"the chat template refuses this conversation: {e}") from e
        try:
            text = owner.apply_chat_template(folded, tokenize=False, **kwargs)
        except TemplateError as e2:
            raise ChatTemplateError(f"the chat template refuses this conversation, even with the system message "
                                    f"folded into the first user turn: {e2}") from e2
        tpl = kwargs.get("chat_template") or getattr(owner, "chat_template", None)
        key = hash(tpl if isinstance(tpl, str) else repr(tpl))
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"the chat template refuses a system message here ({e}): the system text is folded into "
                          "the first user turn", stacklevel=3)
        return text
