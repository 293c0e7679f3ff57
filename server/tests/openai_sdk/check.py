"""The official `openai` Python package against Tollgate's gateway, unchanged but
for `base_url` and the key (DESIGN.md §4).

Run by `server/tests/gateway.rs` with TOLLGATE_BASE_URL (e.g.
http://127.0.0.1:PORT/v1) and TOLLGATE_API_KEY; prints one line per check, which
the Rust test reads, and exits non-zero on the first failure.

The catalog is the test's: `test/big` is an alias of `big`; `mid` is capped (so
it falls back to `flat`); `small` is capped with nothing cheaper (so it is
blocked).
"""

import os
import sys

import openai
from openai import OpenAI


def main() -> int:
    client = OpenAI(
        base_url=os.environ["TOLLGATE_BASE_URL"],
        api_key=os.environ["TOLLGATE_API_KEY"],
        timeout=30,
    )
    messages = [{"role": "user", "content": "Say hello."}]

    raw = client.chat.completions.with_raw_response.create(
        model="test/big", messages=messages, max_tokens=50
    )
    completion = raw.parse()
    assert raw.headers["x-tollgate-model"] == "big", raw.headers
    assert completion.choices[0].message.content == "Hello from the mock.", completion
    assert completion.usage is not None and completion.usage.prompt_tokens == 12
    print(f"non-streamed: served by {completion.model}")

    models = set()
    usage = None
    content = []
    stream = client.chat.completions.create(
        model="test/big",
        messages=messages,
        max_tokens=50,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        models.add(chunk.model)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                content.append(choice.delta.content)
    assert models == {"big"}, models
    assert usage is not None, "the usage chunk was asked for"
    assert "".join(content) == "piece 0 piece 1 piece 2 ", content
    print(f"streamed: served by {models.pop()}")
    print(f"streamed usage: prompt {usage.prompt_tokens}, completion {usage.completion_tokens}")

    # Without asking for usage, no chunk carries it.
    for chunk in client.chat.completions.create(
        model="big", messages=messages, max_tokens=50, stream=True
    ):
        assert chunk.usage is None, chunk

    capped = client.chat.completions.create(model="mid", messages=messages, max_tokens=50)
    print(f"capped: served by {capped.model}")

    listed = sorted(m.id for m in client.models.list())
    assert listed == ["big", "flat", "mid", "small"], listed

    try:
        # max_retries=2: the SDK would retry a 429 unless told not to.
        client.with_options(max_retries=2).chat.completions.create(
            model="small", messages=messages, max_tokens=50
        )
    except openai.RateLimitError as e:
        assert e.status_code == 429
        assert e.code == "plan_limit_reached" or e.code == "model_limit_reached", e.body
        assert e.type == "insufficient_quota", e.body
        print(f"blocked: {e.code}")
    else:
        print("a capped model without a cheaper one was served", file=sys.stderr)
        return 1

    try:
        client.chat.completions.create(model="nope", messages=messages)
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", e.body
    else:
        print("an unknown model was served", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
