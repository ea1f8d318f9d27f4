"""Chat templates in Ray Data workers: a small picklable `ChatRenderer`, built on the driver from
the tokenizer (or ``data.chat_template``), that renders message lists exactly as
``tokenizer.apply_chat_template(..., tokenize=False)`` does — it calls the same transformers
function (``render_jinja_template``) with the same template and special tokens — without
loading the tokenizer in every worker.

`ChatRenderer.pair` turns a conversational preference row into text the way TRL's
``apply_chat_template`` does (TRL is not imported; ``tests/test_data_formats.py`` checks the
rule against the tokenizer itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import takewhile
from typing import Any


class NoChatTemplate(ValueError):
    """Message rows need a chat template and neither the tokenizer nor the config has one."""


@dataclass(frozen=True)
class ChatRenderer:
    template: str
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ...: what templates see

    @classmethod
    def from_tokenizer(cls, tokenizer, template: str | None = None) -> ChatRenderer | None:
        """The renderer of ``template`` (when given) or the tokenizer's own chat template, with
        the tokenizer's special tokens; None when there is no template at all. A template that
        does not compile raises ``ValueError`` naming the jinja error."""
        if template is None:
            if tokenizer is None:
                return None
            try:
                template = tokenizer.get_chat_template()
            except ValueError:  # no template, or several and none named "default"
                return None
        renderer = cls(template, dict(tokenizer.special_tokens_map) if tokenizer is not None else {})
        renderer.check()
        return renderer

    def check(self) -> None:
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import _compile_jinja_template

        try:
            _compile_jinja_template(self.template)
        except TemplateError as e:
            raise ValueError(f"the chat template is not valid jinja: {' '.join(str(e).split())}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               continue_final_message: bool = False) -> str:
        """``tokenizer.apply_chat_template(messages, tokenize=False, ...)``; null-valued message
        keys are dropped first, as ``apply_chat_template`` does."""
        from transformers.utils.chat_template_utils import render_jinja_template

        from raydpo.data.formats import normalize

        out, _ = render_jinja_template(conversations=[normalize(messages)], chat_template=self.template,
                                       add_generation_prompt=add_generation_prompt,
                                       continue_final_message=continue_final_message, **self.special_tokens)
        return out[0]

    def pair(self, prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> tuple[str, str, str]:
        """``(prompt, chosen, rejected)`` as text, TRL's ``apply_chat_template`` rule: the prompt
        rendered with the generation prompt (continued instead when its last turn is the
        assistant's); each response is what rendering prompt + response as one conversation adds
        after the prompt — the prompt first cut to the part both full renderings start with,
        for templates that render a generation prompt differently from the turn that follows."""
        last: Any = prompt[-1].get("role")
        cont = last == "assistant"
        text = self.render(prompt, add_generation_prompt=not cont, continue_final_message=cont)
        with_chosen = self.render(prompt + chosen)
        text = _common_prefix(text, with_chosen)
        with_rejected = self.render(prompt + rejected)
        text = _common_prefix(text, with_rejected)
        return text, with_chosen[len(text):], with_rejected[len(text):]


def _common_prefix(a: str, b: str) -> str:
    return "".join(x for x, _ in takewhile(lambda p: p[0] == p[1], zip(a, b)))
