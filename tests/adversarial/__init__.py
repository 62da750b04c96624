"""Attacks on real nodes, one property of SECURITY.md per test module."""

import openai


def chat(url: str, secret: str, *, stream: bool = False, content: str = "add two numbers", timeout: float = 60,
         **body):
    """One agora-tiny chat through the official SDK (greedy, 8 tokens); the answer text and its `agora` field."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0, timeout=timeout)
    kw = {"model": "agora-tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 8,
          "temperature": 0, **body}
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.model_extra["agora"]
    text, agora = "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        agora = (chunk.model_extra or {}).get("agora", agora)
    return text, agora
