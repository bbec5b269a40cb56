"""An HF folder's tokenizer from tokenizer.json + tokenizer_config.json, without importing transformers.

transformers' AutoTokenizer took ~1 s of wall time per process here on top of a 5-11 s import; the
driver, the decode worker's stop checker and every benchmark only need what `tokenizers` (Rust)
and jinja2 already do. `HFTokenizer` is transformers 5's `TokenizersBackend` for the folders where
that class does nothing beyond the Rust tokenizer: the same ids for text (the file's own
post-processor), the same chat template rendering (the same sandboxed jinja2 environment, options,
filters, globals and special-token variables), the same decode. Any setting that would make
transformers change the Rust tokenizer (tokens it adds, a model-specific class, truncation, the
Mistral regex patch, clean-up of spaces) raises `NotPlainTokenizer`, and the caller uses
transformers (`engine.loader.load_tokenizer`). tests/engine/test_hf_files.py checks the equality.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

# What transformers 5 loads as a plain TokenizersBackend from tokenizer.json.
PLAIN_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Files and settings through which transformers adds or changes tokens, templates or text.
NOT_PLAIN_FILES = ("special_tokens_map.json", "added_tokens.json", "chat_template.json", "additional_chat_templates")
NOT_PLAIN_KEYS = ("fast_tokenizer_files", "auto_map", "add_prefix_space", "extra_special_tokens",
                  "additional_special_tokens", "model_specific_special_tokens")


class NotPlainTokenizer(ValueError):
    """transformers would do more than tokenizer.json says: load it with transformers."""


class HFTokenizer:
    """The parts of a transformers tokenizer pdserve uses: call, encode, decode, chat template."""

    def __init__(self, backend: Any, special: dict[str, str], chat_template: str | None) -> None:
        self.backend = backend  # tokenizers.Tokenizer
        self.special_tokens_map = dict(special)  # bos_token etc. -> text, as the chat template sees them
        self.chat_template = chat_template
        for name, text in special.items():
            setattr(self, name, text)
            setattr(self, f"{name}_id", backend.token_to_id(text))

    @classmethod
    def from_folder(cls, folder: Path) -> HFTokenizer:
        folder = Path(folder)
        for name in NOT_PLAIN_FILES:
            if (folder / name).exists():
                raise NotPlainTokenizer(f"{name} present")
        config_file, tokenizer_file = folder / "tokenizer_config.json", folder / "tokenizer.json"
        if not (config_file.is_file() and tokenizer_file.is_file()):
            raise NotPlainTokenizer("no tokenizer.json + tokenizer_config.json")
        config = json.loads(config_file.read_text(encoding="utf-8"))
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(tokenizer_file))
        special = _check_plain(config, backend)
        template = folder / "chat_template.jinja"
        chat_template = template.read_text(encoding="utf-8") if template.is_file() else config.get("chat_template")
        if chat_template is not None and not isinstance(chat_template, str):
            raise NotPlainTokenizer("several named chat templates")
        return cls(backend, special, chat_template)

    # ---- the transformers calls pdserve makes --------------------------------------------------
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: int | Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the named special tokens, first occurrence order (transformers' all_special_ids)."""
        return [self.backend.token_to_id(t) for t in dict.fromkeys(self.special_tokens_map.values())]

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, return_dict: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> Any:
        """The conversation rendered by the chat template; tokenized without added special tokens."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if not messages:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        chat = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
        text = _compiled(self.chat_template).render(messages=chat, tools=tools, documents=None,
                                                     add_generation_prompt=add_generation_prompt,
                                                     **self.special_tokens_map)
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return {"input_ids": ids} if return_dict else ids


def _check_plain(config: dict[str, Any], backend: Any) -> dict[str, str]:
    """The named special tokens (bos_token... -> text) when transformers would load tokenizer.json as
    it is; NotPlainTokenizer naming the first reason otherwise."""
    if config.get("tokenizer_class") not in PLAIN_CLASSES:
        raise NotPlainTokenizer(f"tokenizer_class {config.get('tokenizer_class')!r}")
    for key in NOT_PLAIN_KEYS:
        if config.get(key):
            raise NotPlainTokenizer(f"tokenizer_config.json sets {key}")
    if config.get("split_special_tokens"):
        raise NotPlainTokenizer("split_special_tokens")
    extra = [k for k, v in config.items() if k.endswith("_token") and k not in NAMED_SPECIAL and isinstance(v, str)]
    if extra:
        raise NotPlainTokenizer(f"model-specific special tokens {extra}")
    if backend.truncation is not None or backend.padding is not None:
        raise NotPlainTokenizer("tokenizer.json sets truncation or padding")
    if backend.get_vocab_size() > 100_000 and backend.pre_tokenizer is not None:
        raise NotPlainTokenizer("a vocabulary over 100k (transformers may patch its regex)")
    if config.get("clean_up_tokenization_spaces") and (
            type(backend.model).__name__ != "BPE"
            or config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")):
        raise NotPlainTokenizer("clean_up_tokenization_spaces")
    by_id = backend.get_added_tokens_decoder()
    added = {t.content: t for t in by_id.values()}
    for idx, tok in (config.get("added_tokens_decoder") or {}).items():
        known = by_id.get(int(idx))
        if known is None or known.content != tok.get("content") or known.special != tok.get("special"):
            raise NotPlainTokenizer(f"added_tokens_decoder[{idx}] differs from tokenizer.json")
    special = {}
    for name in NAMED_SPECIAL:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            continue
        if not isinstance(value, str) or value not in added or not added[value].special:
            raise NotPlainTokenizer(f"{name} {value!r} is not a special added token of tokenizer.json")
        special[name] = value
    return special


def _alias_reasoning(message: dict[str, Any]) -> dict[str, Any]:
    """transformers passes a message's reasoning under every name templates read."""
    fields = ("reasoning_content", "thinking", "reasoning")
    reasoning = next((message[k] for k in fields if message.get(k) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


@cache
def _compiled(template: str) -> Any:
    """The template in transformers' environment: sandboxed, trim/lstrip blocks, loop controls,
    a non-escaping tojson, raise_exception, strftime_now, dict and a namespace without dunders."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %} renders its body (transformers tracks its span
        only for assistant masks, which pdserve never asks for)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(template)
