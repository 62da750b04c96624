"""The vLLM logits processor's rule (agoranet.engine.vllm_rule) without vLLM: every row it touches keeps
exactly one finite logit, the token `verify.rule.choose_token` picks; malformed arguments are refused."""

from __future__ import annotations

import pytest
import torch

from agoranet.engine.vllm_rule import RULE_DIGEST, RuleArgs, apply_rule, parse_args
from agoranet.verify.rule import choose_token


def _args(**kw):
    return {"agora_seed": 7, "agora_request_id": "r-1", "agora_temperature": 0.8, "agora_top_p": 0.9,
            "agora_prompt_len": 12, "agora_prefix_len": 3} | kw


def test_rows_keep_only_the_rules_token():
    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    before = logits.clone()
    greedy = parse_args(_args(agora_temperature=0.0))
    hot = parse_args(_args())
    apply_rule(logits, [(0, hot, 0), (2, hot, 5), (3, greedy, 1)])
    for row, args, n in [(0, hot, 0), (2, hot, 5), (3, greedy, 1)]:
        want = choose_token(before[row], temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            request_id=args.request_id, position=args.prefix_len + n)
        assert torch.isfinite(logits[row]).nonzero().flatten().tolist() == [want]
    assert torch.equal(logits[1], before[1])  # a request that did not ask for the rule is left alone


def test_forced_probe_and_no_args():
    logits = torch.zeros(1, 10)
    apply_rule(logits, [(0, RuleArgs(0, "", 0.0, 1.0, 0, 0, force=4), 0)])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [4]
    assert parse_args(None) is None and parse_args({"other": 1}) is None


@pytest.mark.parametrize("bad, match", [
    ({"agora_seed": 1}, "needs vllm_xargs"),
    (_args(agora_request_id=5), "string"),
    (_args(agora_top_p=0), "agora_top_p"),
    (_args(agora_temperature=-1), "≥ 0"),
    (_args(agora_seed="x"), "integer"),
    (_args(agora_rule="0123456789abcdef"), "another version of Agora's sampling rule"),
])
def test_malformed_arguments_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_args(bad)


def test_the_providers_rule_digest_is_accepted():
    assert parse_args(_args(agora_rule=RULE_DIGEST)).seed == 7
