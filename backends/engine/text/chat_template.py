"""The model's own chat template, rendered in a Jinja sandbox.

Templates come from the model files (GGUF ``tokenizer.chat_template``, ``tokenizer_config.json``
or ``chat_template.jinja``) — code we did not write — so they run in jinja2's
``ImmutableSandboxedEnvironment``: no access to private attributes, no mutation of the messages.
The environment matches what templates are written against (HF transformers' conventions):
``trim_blocks``/``lstrip_blocks``, ``{% break %}``/``{% continue %}``, a ``tojson`` filter that
keeps non-ASCII text, and the ``raise_exception(message)`` and ``strftime_now(format)`` globals;
the context holds ``messages`` (dicts with string ``content``), ``add_generation_prompt``,
``bos_token`` and ``eos_token``.

The rendered prompt already spells the special tokens it needs (BOS included when the template
writes it): encode it with ``add_special_tokens=False``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gateway.errors import ConfigError, InvalidRequestError
from gateway.interface import ChatMessage
from gateway.tools import template_message

if TYPE_CHECKING:
    from backends.engine.text.tokenizer import Tokenizer


class _TemplateRaised(Exception):
    """The template called ``raise_exception(message)``: the request is not one it accepts."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters (<, >, &, '), which would change prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """Renders chat messages into a prompt string with one model's template.

    ``source=None`` means the model has no template: ``render`` raises ``InvalidRequestError``
    (completions still work). A template that does not compile is a ``ConfigError`` here, at
    load time.
    """

    def __init__(
        self,
        source: str | None,
        *,
        bos_token: str = "",
        eos_token: str = "",
        now: Callable[[], datetime] = datetime.now,
    ) -> None:
        self.source = source
        self._context = {"bos_token": bos_token, "eos_token": eos_token}
        self._template: jinja2.Template | None = None
        if source is None:
            return
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"the model's chat template does not compile: {exc} (line {exc.lineno})") from exc

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, **kwargs: Any) -> ChatTemplate:
        return cls(tokenizer.chat_template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, **kwargs)

    @property
    def available(self) -> bool:
        return self._template is not None

    def render(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        extra_context: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt for ``messages``; ``InvalidRequestError`` (param ``messages``) when the model
        has no template or the template rejects the conversation (its own message is kept)."""
        if self._template is None:
            raise InvalidRequestError(
                "this model has no chat template, so it cannot serve chat completions; "
                "use the completions endpoint with a prompt instead",
                param="messages",
            )
        context = {
            **(extra_context or {}),
            **self._context,
            "messages": [_message_dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(context)
        except _TemplateRaised as exc:
            raise InvalidRequestError(str(exc), param="messages") from exc
        except Exception as exc:  # a template is foreign code: any failure is about these messages
            raise InvalidRequestError(
                f"the model's chat template failed on these messages: {type(exc).__name__}: {exc}",
                param="messages",
            ) from exc


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    return template_message(message)  # with tool_calls / tool_call_id for templates that read them
