"""The online server's parts that need no cluster: streamed text, the prefill-rate meter, admission."""

from __future__ import annotations

import pytest

from engine.config import SamplingParams
from pdserve.observability.metrics import SLO
from pdserve.openai.responses import output_text
from pdserve.serve.admission import Admission, AdmissionConfig, PrefillRate
from pdserve.serve.errors import ApiError
from pdserve.serve.text import TextStream, _held_back
from router.request import Request


def _req(prompt_len: int = 10, stop: tuple[str, ...] = (), slo: dict | None = None, n: int = 0) -> Request:
    return Request(f"r{n}", f"cmpl-{n}", n, "completion", [1] * prompt_len, SamplingParams(max_tokens=8, stop=stop),
                   slo=slo)


@pytest.mark.parametrize("stop", [(), ("world",), ("wor", "never"), ("🌍",)])
def test_streamed_deltas_add_up_to_the_batch_text(tokenizer, stop):
    text = "Héllo, 👋 wörld! 日本語のテキスト and the world 🌍 ends here."
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    req = _req(stop=stop)
    stream = TextStream(req, tokenizer)
    deltas = [stream.add([t]) for t in ids]
    req.output_token_ids = ids
    deltas.append(stream.finish(req))
    assert "".join(deltas) == output_text(req, tokenizer)
    assert "\ufffd" not in "".join(deltas)
    assert sum(1 for d in deltas if d) > 5, "text flows as it is generated"
    for s in stop:
        assert s not in "".join(deltas)


def test_held_back_is_the_longest_stop_prefix():
    assert _held_back("hello wo", ("world",)) == 2
    assert _held_back("hello w", ("xyz", "wx")) == 1
    assert _held_back("hello", ("world",)) == 0
    assert _held_back("ab", ("abc", "b")) == 2


def test_prefill_rate_counts_a_batch_once():
    rate = PrefillRate()
    assert rate.tokens_per_s() is None
    for _ in range(4):  # one batch of four 100-token prompts, 1 s
        rate.observe(10.0, 11.0, 100)
    rate.observe(12.0, 13.0, 200)  # one more batch after an idle second: idle time does not count
    assert rate.tokens_per_s() == pytest.approx(600 / 2)


def test_prefill_rate_of_a_burst_is_its_wall_time():
    """Four requests arrive at once and reach their first tokens one second apart: 100 tokens/s,
    whatever part of each second the prefill kernels took."""
    rate = PrefillRate()
    for k in range(1, 5):
        rate.observe(0.0, float(k), 100)
    assert rate.tokens_per_s() == pytest.approx(400 / 4)


def _prime(adm: Admission, tokens_per_s: float) -> None:
    adm.rate.observe(0.0, 1.0, int(tokens_per_s))


def test_slo_admission_refuses_what_would_miss_its_ttft():
    adm = Admission(AdmissionConfig("slo", headroom=1.0), SLO(ttft_s=1.0))
    adm.admit(_req(500, n=0))  # no measurement yet: admitted
    _prime(adm, 1000)
    adm.admit(_req(400, n=1))  # 900 tokens ahead and its own: 0.9 s
    with pytest.raises(ApiError) as e:
        adm.admit(_req(200, n=2))  # 1.1 s
    assert e.value.status == 429 and int(e.value.headers["Retry-After"]) >= 1
    adm.admit(_req(200, slo={"ttft_s": 2.0}, n=3))  # its own SLO is looser
    first = _req(500, n=0)
    adm.prefilled(first)
    adm.admit(_req(100, n=4))  # the first left the queue: room again
    assert adm.refused == 1


def test_always_admission_bounds_the_queue():
    adm = Admission(AdmissionConfig("always", max_queue=2), SLO(ttft_s=0.001))
    _prime(adm, 10)
    adm.admit(_req(1000, n=0))
    adm.admit(_req(1000, n=1))  # hopeless TTFT, but 'always' admits
    with pytest.raises(ApiError) as e:
        adm.admit(_req(1, n=2))
    assert e.value.status == 503 and e.value.headers["Retry-After"] == "1"
    adm.gone(_req(1000, n=1))
    adm.admit(_req(1, n=3))
    with pytest.raises(ValueError):
        AdmissionConfig("sometimes")
    with pytest.raises(ValueError):
        AdmissionConfig("slo", headroom=1.5)


def test_headroom_keeps_a_margin():
    adm = Admission(AdmissionConfig("slo", headroom=0.5), SLO(ttft_s=1.0))
    _prime(adm, 1000)
    adm.admit(_req(400, n=0))  # 0.4 s <= 0.5 s
    with pytest.raises(ApiError):
        adm.admit(_req(200, n=1))  # 0.6 s: within the SLO, not within the headroom


def test_servers_start_decoding_each_request_at_once_unless_asked():
    """--batch-admissions auto: a server's router admits eagerly (each stream's TPOT counts); run-batch's
    and a deployment's leave it to the router (on when the workers share one CPU node); on/off force it.
    serve --deployment cannot change the deployment's router."""
    from pdserve.cli import build_parser, engine_config, main, router_config

    for command, auto in ((["run-batch", "-i", "in.jsonl", "-o", "out.jsonl"], None), (["up"], None),
                          (["serve"], False), (["bench", "serve"], False)):
        args = build_parser().parse_args(command)
        assert router_config(args, engine_config(args)).batch_admissions is auto, command
        for flag, want in (("on", True), ("off", False)):
            args = build_parser().parse_args([*command, "--batch-admissions", flag])
            assert router_config(args, engine_config(args)).batch_admissions is want
    assert main(["serve", "--deployment", "d", "--batch-admissions", "off"]) == 2
