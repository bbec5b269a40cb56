"""The tokenizer and config read without transformers equal transformers' own (AutoTokenizer,
AutoConfig) on the default model, the tiny test models and tokenizer folders built to exercise each
setting; folders only transformers reads exactly go through transformers."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from engine.families import read_arch
from engine.hf_config import HFConfig, NotPlainConfig, read_config
from engine.hf_tokenizer import HFTokenizer, NotPlainTokenizer
from engine.loader import load_hf_config, load_tokenizer
from engine.model.rope import rope_inv_freq

TEXTS = [
    "Hello, world!", "  leading and trailing spaces  ", "tabs\tand\nnew\n\nlines\r\n", "", " ",
    "The planets are Mercury, Venus, Earth and Mars.", "def f(x):\n    return x ** 2  # square\n",
    "Ünïcödé façade, naïve café — “quotes” … 日本語のテキスト, 中文, 한국어, emoji 🙂🚀👍🏽",
    "special tokens in text: <|im_start|>user\nhi<|im_end|> and <|endoftext|> and <repo_name>",
    "almost special: <|im_start and im_end|> <|im_end|<|im_end|>", "12345 67.89 0x1F 1e-9 -42",
    "a" * 300, "word " * 120, "mixed\u00a0nbsp\u200bzero-width\u2028line-sep", "<|im_start|><|im_end|>",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke <|im_end|> please"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
    [{"role": "user", "content": "line one\n\nline two\n"}, {"role": "assistant", "content": "ok"}],
    [{"role": "user", "content": "日本語 🙂 and  double  spaces "}],
    [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "then me"}],
]

# A template that uses what transformers' environment adds: namespace, tojson, loop controls,
# raise_exception, a {% generation %} block, the special-token variables, trim/lstrip of blocks.
RICH_TEMPLATE = """{%- set ns = namespace(system=none) -%}
{%- for m in messages -%}
  {%- if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% continue %}{% endif -%}
  {%- if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}
{{ bos_token }}{{ m['role'] }} {{ {'len': m['content'] | length, 'c': m['content']} | tojson }}
  {%- if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}{% endif %}
{% endfor -%}
{%- if ns.system is not none %}[system: {{ ns.system }}]{% endif -%}
{% for m in messages %}
    {% if m['role'] == 'user' %}
U: {{ m['content'] }}
    {% endif %}
{% endfor %}
{%- if add_generation_prompt %}{{ bos_token }}assistant
{% endif -%}"""


@pytest.fixture(scope="module")
def reference(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def _variant(src: Path, dst: Path, config: dict | None = None, tokenizer_json=None, template: str | None = "keep",
             extra: dict[str, str] | None = None) -> Path:
    """A copy of `src`'s tokenizer files with tokenizer_config.json updated by `config` (None values
    remove keys), tokenizer.json edited by `tokenizer_json`, the .jinja template kept/replaced/removed."""
    dst.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / f).is_file():
            shutil.copy(src / f, dst / f)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    for k, v in (config or {}).items():
        cfg.pop(k, None) if v is None else cfg.__setitem__(k, v)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    if tokenizer_json is not None:
        raw = json.loads((dst / "tokenizer.json").read_text())
        tokenizer_json(raw)
        (dst / "tokenizer.json").write_text(json.dumps(raw))
    if template is None:
        (dst / "chat_template.jinja").unlink(missing_ok=True)
    elif template != "keep":
        (dst / "chat_template.jinja").write_text(template)
    for name, text in (extra or {}).items():
        (dst / name).write_text(text)
    return dst


def _random_ids(vocab: int, rng: random.Random, n: int) -> list[list[int]]:
    seqs = [[rng.randrange(vocab) for _ in range(rng.randint(1, 40))] for _ in range(n)]
    seqs += [[rng.randrange(20) for _ in range(8)] for _ in range(10)]  # dense in special tokens
    return seqs


def assert_same_tokenizer(ours, ref, conversations=CONVERSATIONS, chat=True) -> None:
    assert isinstance(ours, HFTokenizer)
    assert len(ours) == len(ref)
    assert ours.get_vocab() == ref.get_vocab()
    assert sorted(ours.all_special_ids) == sorted(ref.all_special_ids)
    assert ours.special_tokens_map == ref.special_tokens_map
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name, None) == getattr(ref, name), name
    for text in TEXTS:
        assert ours(text)["input_ids"] == list(ref(text)["input_ids"]), text
        plain = ref(text, add_special_tokens=False)["input_ids"]
        assert ours(text, add_special_tokens=False)["input_ids"] == list(plain)
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    if chat:
        for conv in conversations:
            for gen in (True, False):
                want = ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True, return_dict=True)
                got = ours.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True, return_dict=True)
                assert got["input_ids"] == list(want["input_ids"]), (conv, gen)
                assert ours.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False) == \
                    ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
    rng = random.Random(0)
    ids_list = _random_ids(len(ref), rng, 150) + [ref(t)["input_ids"] for t in TEXTS]
    ids_list += [ref(t)["input_ids"][:k] for t in TEXTS[7:8] for k in range(1, 12)]  # characters cut mid-byte
    for ids in ids_list:
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (ids, skip)
    assert ours.decode(5) == ref.decode(5)


def test_default_model_tokenizer_equals_transformers(default_model_dir, reference):
    ours = load_tokenizer(default_model_dir)
    assert_same_tokenizer(ours, reference)
    assert ours.chat_template == reference.chat_template


def test_tokenizer_settings_equal_transformers(default_model_dir, tmp_path):
    """Each setting transformers reads, in a folder of its own, against AutoTokenizer on that folder."""
    from transformers import AutoTokenizer

    template = (default_model_dir / "chat_template.jinja").read_text()

    def bos_post_processor(raw: dict) -> None:  # a tokenizer that adds BOS and EOS to plain text
        def special(token: str, idx: int) -> dict:
            return {"id": token, "ids": [idx], "tokens": [token]}

        raw["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|im_start|>": special("<|im_start|>", 1), "<|im_end|>": special("<|im_end|>", 2)}}

    def no_post_processor(raw: dict) -> None:
        raw["post_processor"] = None

    variants = {
        "template-in-config": dict(config={"chat_template": template}, template=None),
        "rich-template": dict(template=RICH_TEMPLATE),
        "fast-class": dict(config={"tokenizer_class": "PreTrainedTokenizerFast"}),
        "bos-eos-post-processor": dict(tokenizer_json=bos_post_processor, config={"add_bos_token": True}),
        "no-post-processor": dict(tokenizer_json=no_post_processor,
                                  config={"add_bos_token": True, "add_eos_token": True}),
        "cleanup-bpe": dict(config={"clean_up_tokenization_spaces": True}),
        "other-specials": dict(config={"bos_token": "<|endoftext|>", "pad_token": None,
                                       "eos_token": {"content": "<|im_end|>", "__type": "AddedToken"},
                                       "sep_token": "<file_sep>", "mask_token": "<filename>"}),
    }
    for name, kw in variants.items():
        folder = _variant(default_model_dir, tmp_path / name, **kw)
        ref = AutoTokenizer.from_pretrained(folder)
        ours = load_tokenizer(folder)
        assert isinstance(ours, HFTokenizer), name
        assert_same_tokenizer(ours, ref)


def test_trained_tiny_tokenizers_equal_transformers(tmp_path):
    """Tokenizers of other kinds (WordPiece with a normalizer, Unigram, byte-level BPE), trained here."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer

    corpus = [t for t in TEXTS if t.strip()] * 3 + ["the quick brown fox jumps over the lazy dog"] * 5
    specials = ["<unk>", "<s>", "</s>"]
    bpe_alphabet = pre_tokenizers.ByteLevel.alphabet()
    kinds = {
        "wordpiece": (Tokenizer(models.WordPiece(unk_token="<unk>")),
                      trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials),
                      normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()]),
                      pre_tokenizers.Whitespace(), decoders.WordPiece()),
        "unigram": (Tokenizer(models.Unigram()),
                    trainers.UnigramTrainer(vocab_size=200, special_tokens=specials, unk_token="<unk>"),
                    normalizers.NFKC(), pre_tokenizers.Metaspace(), decoders.Metaspace()),
        "bytelevel-bpe": (Tokenizer(models.BPE()),
                          trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=bpe_alphabet),
                          None, pre_tokenizers.ByteLevel(add_prefix_space=True), decoders.ByteLevel()),
    }
    for name, (tok, trainer, norm, pre, dec) in kinds.items():
        if norm is not None:
            tok.normalizer = norm
        tok.pre_tokenizer, tok.decoder = pre, dec
        tok.train_from_iterator(corpus, trainer)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        folder = tmp_path / name
        folder.mkdir()
        tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "TokenizersBackend", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
             "clean_up_tokenization_spaces": False, "chat_template": RICH_TEMPLATE}))
        conversations = [c for c in CONVERSATIONS if c[0]["role"] != "assistant"]
        assert_same_tokenizer(load_tokenizer(folder), AutoTokenizer.from_pretrained(folder), conversations)


def test_folders_only_transformers_reads_exactly_fall_back(default_model_dir, tmp_path):
    for name, kw in {
        "model-class": dict(config={"tokenizer_class": "LlamaTokenizer"}),
        "extra-specials": dict(config={"extra_special_tokens": ["<repo_name>"]}),
        "legacy-map": dict(extra={"special_tokens_map.json": json.dumps({"bos_token": "<|im_start|>"})}),
        "new-special": dict(config={"mask_token": "<brand-new-mask>"}),
        "truncation": dict(tokenizer_json=lambda raw: raw.__setitem__(
            "truncation", {"max_length": 8, "stride": 0, "strategy": "LongestFirst", "direction": "Right"})),
        "split-special": dict(config={"split_special_tokens": True}),
    }.items():
        folder = _variant(default_model_dir, tmp_path / name, **kw)
        with pytest.raises(NotPlainTokenizer):
            HFTokenizer.from_folder(folder)
        assert not isinstance(load_tokenizer(folder), HFTokenizer), name


# ---- config ---------------------------------------------------------------------------------
def _same_config(folder: Path) -> HFConfig | object:
    from transformers import AutoConfig

    ours, ref = load_hf_config(folder), AutoConfig.from_pretrained(folder)
    arch = read_arch(ours)
    assert arch == read_arch(ref)
    for name in ("rope_parameters", "head_dim", "attention_bias", "tie_word_embeddings", "eos_token_id",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "vocab_size", "model_type"):
        assert getattr(ours, name, "absent") == getattr(ref, name, "absent"), name
    for key in {arch.layer(i).rope for i in range(arch.num_layers)}:
        (a, sa), (b, sb) = rope_inv_freq(ours, key), rope_inv_freq(ref, key)
        assert torch.equal(a, b) and sa == sb
    return ours


def test_config_equals_transformers(default_model_dir, tiny_models, tmp_path):
    assert isinstance(_same_config(default_model_dir), HFConfig)
    for name, folder in tiny_models.items():
        ours = _same_config(folder)
        # Scaled RoPE goes through transformers' parameter functions, so through its config; so do the
        # families read_config does not know (sliding windows, Gemma, Phi) and Qwen2's use_sliding_window.
        assert isinstance(ours, HFConfig) == (name in ("llama", "qwen2", "qwen3")), name
    # The older layout (rope_theta at the top level, rope_scaling null) reads the same.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    cfg = json.loads((tiny_models["qwen2"] / "config.json").read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"] * 100
    cfg["rope_scaling"] = None
    (legacy / "config.json").write_text(json.dumps(cfg))
    assert isinstance(_same_config(legacy), HFConfig)


@pytest.mark.parametrize("drop", ["head_dim", "num_key_value_heads", "eos_token_id", "tie_word_embeddings"])
def test_config_with_class_defaults_falls_back(tiny_models, tmp_path, drop):
    """A field transformers would fill with its class default (Qwen3's head_dim 128, kv heads, eos)."""
    cfg = json.loads((tiny_models["qwen3"] / "config.json").read_text())
    del cfg[drop]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotPlainConfig):
        read_config(tmp_path)
    assert not isinstance(_same_config(tmp_path), HFConfig)


def test_loading_imports_no_transformers(default_model_dir):
    """The point: a worker or the driver reading the default model never imports transformers."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from engine.loader import load_hf_config, load_tokenizer; "
            f"f = Path({str(default_model_dir)!r}); load_hf_config(f); t = load_tokenizer(f); "
            "t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
