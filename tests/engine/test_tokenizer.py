import pytest

from agoranet.engine.models import resolve_model
from agoranet.engine.tokenizer import ByteTokenizer, StreamDecoder

TOK = ByteTokenizer.from_dir(resolve_model("agora-tiny")[0])


def test_bytes_round_trip_including_multibyte_text():
    text = "naïve — 日本 🐍"
    assert TOK.decode(TOK.encode(text)) == text
    assert all(t < 256 for t in TOK.encode(text))


def test_chat_template_renders_a_comment_block_for_the_code_model():
    ids = TOK.chat_prompt([("system", "be brief"), ("user", "add\ntwo numbers"), ("assistant", "def f(): pass"),
                           ("user", "again")])
    assert ids[0] == TOK.bos
    assert TOK.decode(ids[1:]) == (
        "# system:\n# be brief\n# user:\n# add\n# two numbers\n# assistant:\ndef f(): pass\n# user:\n# again\n"
        "# assistant:\n"
    )


def test_stream_decoder_never_splits_a_character():
    dec = StreamDecoder(TOK)
    pieces = [dec.feed(t) for t in TOK.encode("é🐍x")]
    assert pieces == ["", "é", "", "", "", "🐍", "x"]
    assert TOK.token_text(TOK.eos) == "<|eos|>"


def test_hf_tokenizer_of_a_bpe_model_renders_its_chat_template_and_streams_exact_text(real_model):
    import random

    from agoranet.engine.tokenizer import HFTokenizer, load_tokenizer

    tok = load_tokenizer(real_model)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 1024
    assert tok.eos_tokens == {tok.encode("<|im_end|>")[0]}  # from the model's config, a special token
    ids = tok.chat_prompt([("system", "be brief"), ("user", "naïve 🐍")])
    assert tok.token_text(ids[0]) == "<|im_start|>" and max(ids) >= 256  # BPE merges, not bytes
    assert tok.decode(ids) == "system\nbe brief\nuser\nnaïve 🐍\nassistant\n"  # specials skipped in text
    text = "def naïve(x):\n    return '日本語 🐍' * x\n"
    rng = random.Random(0)
    # real text split at every token, and random ids that cut multi-byte characters mid-way
    for seq in [tok.encode(text)] + [[rng.randrange(tok.vocab_size) for _ in range(30)] for _ in range(100)]:
        dec = tok.stream_decoder()
        assert "".join(dec.feed(t) for t in seq) + dec.flush() == tok.decode(seq)
    assert tok.decode(tok.encode(text)) == text


def test_a_model_without_chat_template_refuses_chat_but_completes(real_model, tmp_path):
    import json
    import shutil

    from agoranet.core.errors import RequestError
    from agoranet.engine.tokenizer import load_tokenizer

    bare = shutil.copytree(real_model, tmp_path / "bare")
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(bare)
    assert tok.completion_prompt("def f") == tok.encode("def f")
    with pytest.raises(RequestError, match="no chat template"):
        tok.chat_prompt([("user", "hi")])
