#!/usr/bin/env python3
"""Writes tests/data/chat-templates/NAME.json: a GGUF's chat template, conversations, and
their renderings by Python's jinja2 in the environment Hugging Face transformers renders chat
templates in (sandboxed, trim_blocks, lstrip_blocks, loop controls, raise_exception, tojson
as json.dumps). tests/chat_template.rs holds dynexec's minijinja rendering to them.

    scripts/chat-template-reference.py MODEL.gguf NAME

Needs jinja2 and llama.cpp's gguf-py (GGUF_PY, default: the copy scripts/build-llama-bench.sh
unpacks) with numpy.
"""
import json, os, sys

default_gguf_py = os.path.expanduser(
    "~/.cache/dynexec/llama.cpp/llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py")
sys.path.insert(0, os.environ.get("GGUF_PY", default_gguf_py))
import gguf  # noqa: E402
import jinja2  # noqa: E402
from jinja2.ext import loopcontrols  # noqa: E402
from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402

CONVERSATIONS = [
    ([{"role": "user", "content": "Write a Python function that checks whether a string is a palindrome."}], True),
    ([{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "Why is the sky blue?"}], True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Name a fruit."}], True),
    ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "4"}], False),
    ([{"role": "user", "content": "  spaces around, a\ttab, and\nnew lines\n\n"}], True),
    ([{"role": "user", "content": "Quotes \" ' and {{ braces }} {% not a tag %} <|im_end|>"}], True),
    ([{"role": "user", "content": "东京 🦀 naïve"}], False),
]


def field(reader, key):
    f = reader.fields[key]
    return bytes(f.parts[f.data[0]]).decode("utf-8") if f.types[0] == gguf.GGUFValueType.STRING else int(f.parts[f.data[0]][0])


def main():
    model, name = sys.argv[1:3]
    reader = gguf.GGUFReader(model)
    template = field(reader, "tokenizer.chat_template")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    token = lambda i: bytes(tokens.parts[tokens.data[i]]).decode("utf-8")
    bos = token(field(reader, "tokenizer.ggml.bos_token_id"))
    eos = token(field(reader, "tokenizer.ggml.eos_token_id"))

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)
    cases = []
    for messages, add_generation_prompt in CONVERSATIONS:
        text = compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos, eos_token=eos)
        cases.append({"messages": messages, "add_generation_prompt": add_generation_prompt, "text": text})
    out = {"model": os.path.basename(model), "made_with": f"jinja2 {jinja2.__version__}",
           "template": template, "bos_token": bos, "eos_token": eos, "cases": cases}
    root = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "chat-templates")
    with open(os.path.join(root, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
