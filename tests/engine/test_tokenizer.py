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
