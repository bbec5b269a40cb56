"""`python -m pdserve.bench.grammar_engines`: xgrammar against llguidance on the default model's tokenizer.

How the grammar engine was chosen (docs/structured_outputs.md). Three measurements, same tokenizer
(SmolLM2-135M, 49,152 tokens), one thread (the decode worker fills masks on one helper thread
while the forward holds the cores):

  * compile: a fresh compiler per schema (xgrammar: GrammarCompiler without cache; llguidance: the
    schema to grammar text plus an LLMatcher, which is where it builds its parser);
  * mask time per decode step: `batch` requests with fresh matchers walk valid answers token by
    token; a step fills one bitmask row per request, then each accepts its token. Every request of
    a batch starts at step 0, so the first masks of a request (where lazy engines build their
    lexer states) count as often as they do in serving;
  * coverage: each JSON-schema feature is compiled (refused or not), and random walks under its
    mask (uniform over allowed tokens, a third of the steps among tokens carrying a closing
    character) are validated with `jsonschema`: a keyword an engine accepts but ignores shows up
    as invalid answers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$"},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["admin", "user", "guest"]}, "maxItems": 3}},
    "required": ["name", "age", "email", "tags"], "additionalProperties": False}
ORDER = {"type": "object", "properties": {
    "id": {"type": "string"}, "items": {"type": "array", "minItems": 1, "items": {
        "type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
                                         "price": {"type": "number"}},
        "required": ["sku", "qty", "price"], "additionalProperties": False}},
    "status": {"enum": ["open", "paid", "shipped"]}, "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
    "required": ["id", "items", "status", "note"], "additionalProperties": False}
EVENT = {"type": "object", "properties": {
    "title": {"type": "string", "minLength": 3, "maxLength": 60},
    "day": {"type": "string", "pattern": "^\\d{4}-\\d{2}-\\d{2}$"},
    "attendees": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 5},
    "location": {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                 "required": ["city", "country"], "additionalProperties": False}},
    "required": ["title", "day", "attendees", "location"], "additionalProperties": False}

# Timed schemas with a valid answer each, as a model would write it.
TIMED = {
    "person": (PERSON, {"name": "Alice Johnson", "age": 34, "email": "alice@example.com", "tags": ["admin", "user"]}),
    "order": (ORDER, {"id": "A-1042", "items": [{"sku": "KB-101", "qty": 2, "price": 19.99},
                                               {"sku": "MS-7", "qty": 1, "price": 9.5}],
                      "status": "paid", "note": None}),
    "event": (EVENT, {"title": "Quarterly planning meeting", "day": "2025-03-14",
                      "attendees": ["Bob", "Carla", "Dan"], "location": {"city": "Paris", "country": "France"}}),
}


def _obj(props: dict, required: list[str] | None = None, **extra: Any) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **extra}


# Feature -> a schema using it. The first block is issue 27's list; the rest is what else users send.
FEATURES: dict[str, dict] = {
    "object + required": _obj({"a": {"type": "string"}, "b": {"type": "integer"}}, ["a"]),
    "additionalProperties: false": _obj({"a": {"type": "boolean"}}),
    "enum": _obj({"c": {"enum": ["red", "green", "blue"]}}),
    "array minItems/maxItems": _obj({"xs": {"type": "array", "items": {"type": "integer"}, "minItems": 2,
                                            "maxItems": 4}}),
    "integer minimum/maximum": _obj({"n": {"type": "integer", "minimum": -5, "maximum": 17}}),
    "integer exclusiveMinimum/Maximum": _obj({"n": {"type": "integer", "exclusiveMinimum": 0,
                                                    "exclusiveMaximum": 100}}),
    "string pattern": _obj({"s": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"}}),
    "string minLength/maxLength": _obj({"s": {"type": "string", "minLength": 2, "maxLength": 5}}),
    "nesting (3 levels)": _obj({"o": _obj({"p": _obj({"q": {"type": "integer"}})})}),
    "anyOf": _obj({"v": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 4}]}}),
    "const": _obj({"k": {"const": "fixed"}}),
    "number minimum/maximum": _obj({"x": {"type": "number", "minimum": 0.5, "maximum": 2.5}}),
    "$defs + $ref": {"$defs": {"pt": _obj({"x": {"type": "integer"}, "y": {"type": "integer"}})},
                     **_obj({"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}})},
    "recursive $ref": {"$defs": {"node": _obj({"v": {"type": "integer"}, "kids": {
        "type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/node"}}})}, "$ref": "#/$defs/node"},
    "oneOf": _obj({"v": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}}),
    "allOf": {"allOf": [_obj({"a": {"type": "integer"}}, []), {"required": ["a"]}]},
    "type list [string, null]": _obj({"v": {"type": ["string", "null"]}}),
    "format date": _obj({"d": {"type": "string", "format": "date"}}),
    "format date-time": _obj({"d": {"type": "string", "format": "date-time"}}),
    "format email": _obj({"e": {"type": "string", "format": "email", "maxLength": 24}}),
    "format uuid": _obj({"u": {"type": "string", "format": "uuid"}}),
    "prefixItems": _obj({"t": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
                               "items": False}}),
    "multipleOf": _obj({"n": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100}}),
    "uniqueItems": _obj({"xs": {"type": "array", "items": {"enum": [1, 2, 3]}, "uniqueItems": True,
                                "maxItems": 3}}),
    "minProperties/maxProperties": {"type": "object", "additionalProperties": {"type": "integer"},
                                    "minProperties": 1, "maxProperties": 2},
    "patternProperties": {"type": "object", "patternProperties": {"^x_[a-z]+$": {"type": "integer"}},
                          "additionalProperties": False},
    "not": _obj({"v": {"type": "integer", "not": {"const": 3}}}),
    "if/then/else": {"type": "object", "properties": {"k": {"enum": ["a", "b"]}, "v": {}}, "required": ["k", "v"],
                     "if": {"properties": {"k": {"const": "a"}}}, "then": {"properties": {"v": {"type": "integer"}}},
                     "else": {"properties": {"v": {"type": "string"}}}},
}
CLOSERS = set('"]},')


class Engine:
    """The four operations the comparison needs of a grammar engine."""

    name: str

    def compile(self, schema: dict) -> Any: ...
    def matcher(self, compiled: Any) -> Any: ...
    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None: ...
    def accept(self, matcher: Any, token: int) -> bool: ...


class XGrammar(Engine):
    name = "xgrammar"

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos: list[int]) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        started = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size, stop_token_ids=eos)
        self.setup_s = time.perf_counter() - started

    def compile(self, schema: dict) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)


class LLGuidance(Engine):
    name = "llguidance"

    def __init__(self, tokenizer_json: str, vocab_size: int, eos: list[int]) -> None:
        import llguidance

        self.llg = llguidance
        started = time.perf_counter()
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
        self.setup_s = time.perf_counter() - started

    def compile(self, schema: dict) -> Any:
        from engine.structured.spec import JSON_OPTIONS  # the options pdserve compiles with

        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=dict(JSON_OPTIONS))
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.llg.LLMatcher(self.tokenizer, compiled, log_level=0)

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        v = bitmask[row]
        matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * 4)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)


def allowed(bitmask_row: torch.Tensor, vocab: int) -> torch.Tensor:
    """[V] bool from one int32 bitmask row."""
    bits = (bitmask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab].bool()


def compile_times(engine: Engine, repeats: int) -> dict[str, float]:
    """Median ms to compile each timed schema from scratch."""
    out = {}
    for name, (schema, _) in TIMED.items():
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            engine.compile(schema)
            times.append(time.perf_counter() - started)
        out[name] = statistics.median(times) * 1e3
    return out


def mask_step_times(engine: Engine, answers: list[list[int]], compiled: list[Any], batch: int,
                    vocab: int) -> list[float]:
    """Seconds per step to fill `batch` rows (fresh matchers, request i walks answers[i % n]) until all end."""
    bitmask = torch.zeros(batch, (vocab + 31) // 32, dtype=torch.int32)
    walks = [(engine.matcher(compiled[i % len(compiled)]), answers[i % len(answers)]) for i in range(batch)]
    steps = []
    for t in range(max(len(a) for a in answers)):
        live = [(row, m, a) for row, (m, a) in enumerate(walks) if t < len(a)]
        started = time.thread_time()
        for row, m, _ in live:
            engine.fill(m, bitmask, row)
        steps.append(time.thread_time() - started)
        for row, m, a in live:
            if not allowed(bitmask[row], vocab)[a[t]] or not engine.accept(m, a[t]):
                raise AssertionError(f"{engine.name} refused token {t} of a valid answer")
    return steps


def random_walks(engine: Engine, schema: dict, walks: int, max_tokens: int, decode: Callable[[list[int]], str],
                 closers: torch.Tensor, eos: int, seed: int = 0) -> tuple[int, int, int]:
    """(valid, invalid, unfinished) answers of random walks under the engine's mask."""
    import jsonschema

    compiled = engine.compile(schema)
    vocab = closers.shape[0]
    gen = torch.Generator().manual_seed(seed)
    bitmask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
    counts = [0, 0, 0]
    for _ in range(walks):
        m, out = engine.matcher(compiled), []
        for _ in range(max_tokens):
            engine.fill(m, bitmask, 0)
            ok = allowed(bitmask[0], vocab)
            if ok[eos]:
                break
            pick = ok & closers if torch.rand(1, generator=gen).item() < 0.33 and (ok & closers).any() else ok
            ids = pick.nonzero().flatten()
            token = int(ids[torch.randint(len(ids), (1,), generator=gen)])
            engine.accept(m, token)
            out.append(token)
        else:
            counts[2] += 1
            continue
        try:
            jsonschema.validate(json.loads(decode(out)), schema, format_checker=jsonschema.FormatChecker())
            counts[0] += 1
        except (ValueError, jsonschema.ValidationError):
            counts[1] += 1
    return counts[0], counts[1], counts[2]


def coverage(engine: Engine, walks: int, decode: Callable[[list[int]], str], closers: torch.Tensor,
             eos: int) -> dict[str, str]:
    out = {}
    for feature, schema in FEATURES.items():
        try:
            valid, invalid, unfinished = random_walks(engine, schema, walks, 160, decode, closers, eos)
        except Exception as e:  # noqa: BLE001 - an engine's refusal, whatever its type, is the result
            out[feature] = f"refused: {str(e).splitlines()[0][:90]}"
            continue
        out[feature] = f"{valid}/{valid + invalid} valid" + (f", {unfinished} unfinished" if unfinished else "")
    return out


@dataclass(frozen=True)
class Setup:
    vocab: int
    eos: int
    engines: tuple[Engine, ...]
    answers: list[list[int]]
    decode: Callable[[list[int]], str]
    closers: torch.Tensor


def setup(folder: Path) -> Setup:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    vocab, eos = len(hf), hf.convert_tokens_to_ids("<|im_end|>")
    engines = (XGrammar(hf, vocab, [eos]), LLGuidance((folder / "tokenizer.json").read_text(), vocab, [eos]))
    answers = [hf.encode(json.dumps(inst), add_special_tokens=False) + [eos] for _, inst in TIMED.values()]
    texts = [hf.decode([i]) for i in range(vocab)]
    closers = torch.tensor([any(c in t for c in CLOSERS) for t in texts])
    return Setup(vocab, eos, engines, answers, lambda ids: hf.decode(ids), closers)


def run(folder: Path, batches: tuple[int, ...], walks: int, repeats: int) -> dict[str, Any]:
    s = setup(folder)
    report: dict[str, Any] = {}
    for engine in s.engines:
        compiled = [engine.compile(schema) for schema, _ in TIMED.values()]
        masks = {}
        for b in batches:
            steps = []
            for _ in range(repeats):
                steps += mask_step_times(engine, s.answers, compiled, b, s.vocab)
            steps.sort()
            masks[b] = {"mean_ms": statistics.mean(steps) * 1e3, "p99_ms": steps[int(0.99 * (len(steps) - 1))] * 1e3,
                        "max_ms": steps[-1] * 1e3}
        report[engine.name] = {"tokenizer_setup_s": engine.setup_s, "compile_ms": compile_times(engine, repeats),
                               "mask_per_step": masks,
                               "coverage": coverage(engine, walks, s.decode, s.closers, s.eos)}
    return report


def main() -> None:
    from engine.config import default_cache_dir
    from engine.loader import resolve_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--walks", type=int, default=20, help="random walks per coverage feature")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    report = run(resolve_model(None, default_cache_dir()), tuple(int(b) for b in args.batches.split(",")),
                 args.walks, args.repeats)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
