"""Chat templates render like transformers' ``apply_chat_template`` on the same template, inside a
sandbox, with template errors turned into 400s."""

from __future__ import annotations

from datetime import datetime

import pytest

from backends.engine.text.chat_template import ChatTemplate
from gateway.errors import ConfigError, InvalidRequestError
from gateway.interface import ChatMessage

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# In the style of Llama 2 chat: BOS per turn, a system block folded into the first turn, and a
# raise_exception when roles do not alternate.
ALTERNATING = """{% if messages[0]['role'] == 'system' %}
    {% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}
{% else %}
    {% set loop_messages = messages %}{% set system_message = false %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if loop.index0 == 0 and system_message != false %}
        {% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}
    {% else %}
        {% set content = message['content'] %}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
        {{ ' ' + content.strip() + ' ' + eos_token }}
    {% endif %}
{% endfor %}"""

# In the style of Llama 3: headers, trim, a date from strftime_now.
HEADERS = """{{- bos_token }}
{%- set date_string = strftime_now("%d %b %Y") %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\nToday Date: ' + date_string + '<|eot_id|>' }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""

# namespace, {% break %}, tojson (non-ASCII and HTML characters kept), the optional name field.
FEATURES = """{% set ns = namespace(last_user=-1) %}
{% for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{% for m in messages %}
{% if loop.index0 > ns.last_user + 1 %}{% break %}{% endif %}
[{{ m.role }}{% if m.name is defined %} ({{ m.name }}){% endif %}] {{ m.content | tojson }}
{{ {'n': loop.index, 'role': m.role} | tojson(indent=1, sort_keys=True) }}
{% endfor %}
{% if add_generation_prompt %}[assistant]{% endif %}"""

TEMPLATES = {"chatml": CHATML, "alternating": ALTERNATING, "headers": HEADERS, "features": FEATURES}

CONVERSATIONS = [
    [ChatMessage(role="user", content="Hi!")],
    [ChatMessage(role="system", content="Be terse."), ChatMessage(role="user", content="2+2?")],
    [
        ChatMessage(role="user", content="  Tell me about 日本 <b>&</b> 'quotes' \"too\"\n"),
        ChatMessage(role="assistant", content="Sure 😀\n\nLine two. "),
        ChatMessage(role="user", content="more\tplease", name="alice"),
    ],
    [
        ChatMessage(role="system", content="sys"),
        ChatMessage(role="user", content="a"),
        ChatMessage(role="assistant", content="b"),
        ChatMessage(role="user", content="c"),
        ChatMessage(role="assistant", content="d"),
    ],
    [ChatMessage(role="user", content="")],
]


@pytest.fixture(scope="module")
def hf_tokenizer():  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def _as_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        d = {"role": m.role, "content": m.content}
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers_apply_chat_template(hf_tokenizer, name: str, add_generation_prompt: bool) -> None:  # type: ignore[no-untyped-def]
    source = TEMPLATES[name]
    ours = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    hf_tokenizer.chat_template = source
    compared = 0
    for conversation in CONVERSATIONS:
        if name == "alternating" and conversation[-1].role == "assistant" and add_generation_prompt:
            continue
        expected = hf_tokenizer.apply_chat_template(
            _as_dicts(conversation), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours.render(conversation, add_generation_prompt=add_generation_prompt) == expected
        compared += 1
    assert compared >= 4


def test_chatml_example() -> None:
    prompt = ChatTemplate(CHATML).render([ChatMessage(role="user", content="Hi!")])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_errors_are_400_with_the_templates_message() -> None:
    template = ChatTemplate(ALTERNATING, bos_token="<s>", eos_token="</s>")
    with pytest.raises(InvalidRequestError) as info:
        template.render([ChatMessage(role="user", content="a"), ChatMessage(role="user", content="b")])
    assert info.value.message == "Conversation roles must alternate user/assistant/user/assistant/..."
    assert info.value.param == "messages" and info.value.status_code == 400


def test_other_render_failures_are_400() -> None:
    template = ChatTemplate("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(InvalidRequestError, match="chat template failed.*TypeError") as info:
        template.render([ChatMessage(role="user", content="a")])
    assert info.value.param == "messages"


def test_no_template_is_a_400_naming_messages() -> None:
    template = ChatTemplate(None)
    assert not template.available
    with pytest.raises(InvalidRequestError, match="no chat template") as info:
        template.render([ChatMessage(role="user", content="a")])
    assert info.value.param == "messages"


def test_broken_template_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


def test_sandbox() -> None:
    with pytest.raises(InvalidRequestError, match="SecurityError: access to attribute '__class__'"):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])
    # Unsafe attributes of other objects are undefined: nothing leaks into the prompt.
    assert ChatTemplate("{{ ''.__class__ }}{{ raise_exception.__globals__ }}").render([]) == ""
    mutate = ChatTemplate("{% set _ = messages.append({'role': 'x'}) %}{{ messages | length }}")
    with pytest.raises(InvalidRequestError, match="SecurityError"):
        mutate.render([ChatMessage(role="user", content="a")])


def test_strftime_now_uses_the_injected_clock() -> None:
    template = ChatTemplate("{{ strftime_now('%Y-%m-%d') }}", now=lambda: datetime(2024, 7, 1))
    assert template.render([]) == "2024-07-01"


def test_extra_context_and_tokens() -> None:
    template = ChatTemplate("{{ bos_token }}{{ tools | default('none') }}{{ eos_token }}", bos_token="[", eos_token="]")
    assert template.render([], extra_context={"tools": "T"}) == "[T]"
    assert template.render([]) == "[none]"


@pytest.mark.slow
def test_real_model_template_matches_transformers(smollm2_path, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The default model's own template (read from its GGUF) renders as transformers renders it."""
    from backends.engine.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(smollm2_path)
    ours = ChatTemplate.from_tokenizer(tokenizer)
    hf_tokenizer.chat_template = tokenizer.chat_template
    for conversation in CONVERSATIONS:
        for add in (True, False):
            expected = hf_tokenizer.apply_chat_template(_as_dicts(conversation), tokenize=False, add_generation_prompt=add)
            assert ours.render(conversation, add_generation_prompt=add) == expected
    prompt = ours.render([ChatMessage(role="user", content="Hi")])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    # The prompt spells its special tokens: encoded without adding any, they are single tokens.
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.eos_token_id) == 2
