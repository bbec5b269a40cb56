"""Constraint specs, matchers and bitmasks against the default model's tokenizer (no model run).

The bitmask unpacking equals a plain per-bit reference; a matcher allows exactly the tokens that
keep a valid answer reachable (checked by walking valid answers and by random walks validated with
jsonschema); EOS only where the grammar may end; rollback restores the state; draft masks equal the
masks of a matcher that took the drafts for real; bad constraints are refused naming the keyword.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from engine.structured.bitmask import MaskFiller, apply_bitmask_, apply_bitmask_torch_, bitmask_words, fill_rows, unpack
from engine.structured.drafts import draft_bitmask, mask_verify_logits_
from engine.structured.matcher import GrammarCompiler, GrammarViolation
from engine.structured.spec import Constraint, ConstraintError, ConstraintKind

EOS = 2
VOCAB = 49152
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, VOCAB, [EOS])


def allowed_ids(m, vocab=VOCAB) -> set[int]:
    bm = fill_rows([m], vocab)
    return set(unpack(bm, vocab)[0].nonzero().flatten().tolist())


def test_unpack_equals_per_bit_reference():
    gen = torch.Generator().manual_seed(0)
    bm = torch.randint(-2**31, 2**31 - 1, (3, bitmask_words(70)), generator=gen, dtype=torch.int32)
    ref = torch.tensor([[(int(bm[r, t // 32]) >> (t % 32)) & 1 for t in range(70)] for r in range(3)]).bool()
    assert torch.equal(unpack(bm, 70), ref)
    logits = torch.randn(5, 70, generator=gen)
    masked = logits.clone()
    apply_bitmask_(masked, bm, [4, 0, 2])
    for row, r in zip([4, 0, 2], range(3)):
        assert torch.equal(masked[row].isinf(), ~ref[r])
        assert torch.equal(masked[row][ref[r]], logits[row][ref[r]])
    assert torch.equal(masked[[1, 3]], logits[[1, 3]])  # unconstrained rows untouched


@pytest.mark.parametrize("vocab", [70, 49152])
def test_native_kernel_equals_the_torch_path(vocab):
    from engine.kernels import cpu_token_bitmask

    if cpu_token_bitmask() is None:
        pytest.skip("no C++ compiler here: the torch path serves (and is what the other tests check)")
    gen = torch.Generator().manual_seed(3)
    bm = torch.randint(-2**31, 2**31 - 1, (4, bitmask_words(vocab)), generator=gen, dtype=torch.int32)
    bm[0] = -1  # all allowed
    bm[1, : bm.shape[1] // 2] = 0  # runs of forbidden words
    logits = torch.randn(6, vocab, generator=gen)
    for rows in (None, [5, 0, 3, 1]):
        native, ref = logits.clone(), logits.clone()
        if rows is None:
            native, ref, mask = native[:4].contiguous(), ref[:4].contiguous(), bm
        else:
            mask = bm
        apply_bitmask_(native, mask, rows)
        apply_bitmask_torch_(ref, mask, rows)
        assert torch.equal(native, ref)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_token_bitmask().apply_token_bitmask(logits, bm, torch.tensor([0, 1, 2, 6]))


def test_walk_valid_answer_and_eos_only_at_the_end(compiler, tokenizer):
    m = compiler.matcher(Constraint.json_schema(PERSON))
    answer = tokenizer.encode(json.dumps({"name": "Ada", "age": 36}), add_special_tokens=False)
    for t in answer:
        ids = allowed_ids(m)
        assert t in ids and EOS not in ids  # the answer is not whole before its last token
        m.accept(t)
    assert allowed_ids(m) == {EOS} and m.accepts_end()
    m.accept(EOS)
    assert m.ended


def test_forbidden_token_raises(compiler, tokenizer):
    m = compiler.matcher(Constraint.choice(["yes", "no"]))
    bad = tokenizer.encode("maybe", add_special_tokens=False)[0]
    assert bad not in allowed_ids(m)
    with pytest.raises(GrammarViolation):
        m.accept(bad)


def test_replay_equals_the_state_of_a_matcher_that_took_the_tokens(compiler, tokenizer):
    c = Constraint.json_schema(PERSON)
    tokens = tokenizer.encode('{"name": "Bo', add_special_tokens=False)
    live = compiler.matcher(c)
    for t in tokens:
        live.accept(t)
    assert allowed_ids(compiler.replay(c, tokens)) == allowed_ids(live)
    assert allowed_ids(compiler.matcher(c)) != allowed_ids(live)  # the cache hands out fresh copies


@pytest.mark.parametrize("constraint,check", [
    (Constraint.choice(["alpha", "beta gamma", "delta"]), lambda s: s in ("alpha", "beta gamma", "delta")),
    (Constraint(ConstraintKind.REGEX, r"[A-Z]{2}-\d{3}"), lambda s: re.fullmatch(r"[A-Z]{2}-\d{3}", s)),
    (Constraint(ConstraintKind.GRAMMAR, 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'),
     lambda s: re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", s)),
    (Constraint(ConstraintKind.GRAMMAR, 'start: "x" ("," "x")*'), lambda s: re.fullmatch(r"x(,x)*", s)),
    (Constraint(ConstraintKind.JSON_OBJECT), lambda s: isinstance(json.loads(s), dict)),
    (Constraint.json_schema(True), lambda s: json.loads(s) is not None or s == "null"),  # any JSON value
    (Constraint.json_schema(PERSON), lambda s: jsonschema.validate(json.loads(s), PERSON) is None),
])
def test_random_walks_under_the_mask_match(compiler, tokenizer, constraint, check):
    constraint.check()
    gen = torch.Generator().manual_seed(1)
    closers = torch.zeros(VOCAB, dtype=torch.bool)  # tokens ending a value, so walks finish
    for t in tokenizer.encode('"}),+x', add_special_tokens=False):
        closers[t] = True
    for _ in range(12):
        m, out = compiler.matcher(constraint), []
        for _ in range(120):
            ok = unpack(fill_rows([m], VOCAB), VOCAB)[0]
            if ok[EOS]:
                break
            pick = ok & closers if (ok & closers).any() and torch.rand(1, generator=gen) < 0.4 else ok
            ids = pick.nonzero().flatten()
            t = int(ids[torch.randint(len(ids), (1,), generator=gen)])
            m.accept(t)
            out.append(t)
        else:
            continue  # did not finish in 120 tokens: nothing to validate
        assert check(tokenizer.decode(out)), tokenizer.decode(out)


def test_rollback_and_draft_masks_equal_live_masks(compiler, tokenizer):
    c = Constraint.json_schema(PERSON)
    prefix = tokenizer.encode('{"name": "', add_special_tokens=False)
    drafts = tokenizer.encode('Eve", "age": 4', add_special_tokens=False)
    m = compiler.replay(c, prefix)
    before = allowed_ids(m)
    rows = draft_bitmask(m, drafts, VOCAB)
    assert allowed_ids(m) == before  # rolled back
    live = compiler.replay(c, prefix)
    for j, t in enumerate(drafts + [None]):
        assert set(unpack(rows[j:j + 1], VOCAB)[0].nonzero().flatten().tolist()) == allowed_ids(live)
        if t is not None:
            live.accept(t)
    # A forbidden draft: its row is the live mask there, later rows repeat it.
    bad = tokenizer.encode("x", add_special_tokens=False)
    rows = draft_bitmask(compiler.replay(c, prefix[:1]), [prefix[1], bad[0], prefix[2]], VOCAB)
    assert torch.equal(rows[2], rows[3]) and not unpack(rows[1:2], VOCAB)[0][bad[0]]


def test_mask_verify_logits_rows(compiler, tokenizer):
    c = Constraint.choice(["yes"])
    drafts = [[], tokenizer.encode("yes", add_special_tokens=False)]
    logits = torch.zeros(1 + len(drafts[1]) + 1, VOCAB)
    mask_verify_logits_(logits, [None, compiler.matcher(c)], drafts)
    assert not logits[0].isinf().any()  # unconstrained sequence
    assert (~logits[1].isinf()).sum() == 1 and not logits[-1][EOS].isinf()  # the answer, then EOS


def test_helper_thread_filler_equals_inline(compiler, tokenizer):
    c = Constraint.json_schema(PERSON)
    grammars = [compiler.replay(c, tokenizer.encode(p, add_special_tokens=False)) if p is not None else None
                for p in ('{"name": "A', None, '{"name": "Al", "age": 1', '{')]
    inline = MaskFiller(VOCAB).begin(grammars)
    helper = MaskFiller(VOCAB, overlap=True)
    pending = helper.begin(grammars)
    assert pending.rows == inline.rows == [0, 2, 3]
    assert torch.equal(pending.bitmask(), inline.bitmask())
    helper.close()
    assert MaskFiller(VOCAB).begin([None, None]) is None


@pytest.mark.parametrize("constraint,words", [
    (Constraint.json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
    (Constraint.json_schema({"type": "object", "if": {}, "then": {}}), "if"),
    (Constraint.json_schema({"type": "integer", "not": {"const": 1}}), "not"),
    (Constraint.json_schema({"type": "strang"}), "type"),
    (Constraint.json_schema({"type": "object", "properties": {"a": {"minLength": "3"}}}), "properties/a/minLength"),
    (Constraint.json_schema({"type": "integer", "minimum": 5, "maximum": 2}), "minimum"),
    (Constraint.json_schema({"$ref": "#/$defs/missing"}), "$defs/missing"),
    (Constraint.json_schema({"type": "string", "format": "color"}), "Unknown format: color"),
    (Constraint.json_schema(False), "accepts no answer"),
    (Constraint(ConstraintKind.REGEX, "a(b"), "unclosed group"),
    (Constraint(ConstraintKind.REGEX, ""), "non-empty"),
    (Constraint.choice([]), "non-empty list"),
    (Constraint(ConstraintKind.GRAMMAR, 'start: "a" | b'), "unknown name"),
    (Constraint(ConstraintKind.GRAMMAR, "root ::= x"), "Rule 'x' not found"),
])
def test_bad_constraints_are_refused_naming_the_keyword(constraint, words):
    with pytest.raises(ConstraintError, match=re.escape(words)):
        constraint.check()
