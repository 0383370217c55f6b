"""Drives `dynexec serve` with the official openai package:
python3 openai_client.py URL MODEL KEY EMBEDDING_MODEL.

Prints one JSON object with what it saw; exits non-zero on the first mismatch.
"""
import json
import sys

import openai

base, model, key, embedding_model = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=300)
stranger = openai.OpenAI(base_url=base + "/v1", api_key="sk-wrong", max_retries=0, timeout=300)
try:
    stranger.models.list()
    raise AssertionError("a wrong API key must be refused")
except openai.AuthenticationError as e:
    unauthorized = e.status_code

models = [m.id for m in client.models.list().data]
assert model in models, models

messages = [{"role": "user", "content": "Name three fruits."}]
whole = client.chat.completions.create(
    model=model, messages=messages, max_tokens=20, temperature=0, extra_body={"speculative": False}
)
chat = whole.choices[0].message.content
assert whole.choices[0].finish_reason in ("stop", "length"), whole
assert whole.usage.completion_tokens <= 20 and whole.usage.prompt_tokens > 0, whole.usage

pieces, usage = [], None
stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=20,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
    extra_body={"speculative": False},
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
        usage = chunk.usage
assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage

# dynexec's own fields go through extra_body and come back as extra response fields.
drafted = client.chat.completions.create(
    model=model, messages=messages, max_tokens=20, temperature=0, extra_body={"speculative": True}
)
report = drafted.model_extra["dynexec"]
assert report["speculative"]["draft"].startswith("ngram"), report

completion = client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=6, temperature=0
)
assert completion.choices[0].text, completion

# OpenAI's penalties and bias are honoured (plain decoding: they cannot be drafted under).
penalized = client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=6, temperature=0,
    frequency_penalty=1.0, presence_penalty=0.5, logit_bias={"28": 5},
)
assert penalized.choices[0].text, penalized
try:
    client.chat.completions.create(
        model=model, messages=messages, max_tokens=4, response_format={"type": "json_object"}
    )
    raise AssertionError("an unsupported response_format must be refused")
except openai.BadRequestError as e:
    assert e.body["param"] == "response_format", e.body

try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=4)
    raise AssertionError("an unknown model must be refused")
except openai.NotFoundError as e:
    not_found = e.status_code
try:
    client.chat.completions.create(model=model, messages=messages, temperature=9)
    raise AssertionError("a bad temperature must be refused")
except openai.BadRequestError as e:
    bad_request = e.status_code

# Embeddings: the client asks for base64 by default and decodes it; floats on request.
pairs = [
    ("The cat sits outside", "The cat plays in the garden"),
    ("The new movie is awesome", "The new movie is so great"),
    ("I love pasta", "Do you like pizza?"),
]
texts = [t for pair in pairs for t in pair]
embedded = client.embeddings.create(model=embedding_model, input=texts)
assert [d.index for d in embedded.data] == list(range(len(texts))), embedded
assert embedded.usage.prompt_tokens > len(texts), embedded.usage
vectors = [d.embedding for d in embedded.data]
floats = client.embeddings.create(model=embedding_model, input=texts[0], encoding_format="float")
assert max(abs(a - b) for a, b in zip(floats.data[0].embedding, vectors[0])) < 1e-6
cosines = [sum(a * b for a, b in zip(vectors[2 * i], vectors[2 * i + 1])) for i in range(len(pairs))]

print(json.dumps({
    "cosines": cosines,
    "models": models,
    "chat": chat,
    "streamed": "".join(pieces),
    "speculative": drafted.choices[0].message.content,
    "completion": completion.choices[0].text,
    "errors": [not_found, bad_request, unauthorized],
}))
