#!/usr/bin/env python3
"""Writes tests/data/tokenizer/NAME.json: texts and the ids llama.cpp's llama-tokenize gives
them on a GGUF, the reference tests/tokenizer.rs holds dynexec's GGUF tokenizer to.

    scripts/tokenizer-reference.py LLAMA_TOKENIZE MODEL.gguf NAME

LLAMA_TOKENIZE comes from scripts/build-llama-bench.sh (same pinned llama.cpp as llama-bench).
"""
import json, os, subprocess, sys, tempfile

TEXTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < 10; ++i) {\n\tprintf(\"%d\\n\", i);\n}\n",
    "a    b\n\n\n   c     \n  ",
    "line one\r\nline two\r\n\r\n\ttabbed\t\tand  spaced",
    "12345 3.14159 1,000,000 0x1F 2024-12-01",
    "东京是日本的首都。我爱编程！こんにちは世界、안녕하세요",
    "Family: 👨‍👩‍👧‍👦, flag: 🏳️‍🌈, skin: 👍🏽, crab 🦀",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|fim_prefix|>def add(a, b):\n    <|fim_suffix|>\n<|fim_middle|>",
    "I'm sure you'll see it's DON'T and they've we'd",
    "naïve café Ünïcödé — “quotes” and ‘apostrophes’ … ½ ©",
    "   leading spaces and trailing ones   ",
    "مرحبا بالعالم नमस्ते दुनिया Привет мир",
    "x=3.14159;y=x**2//7%3 != 4 && !!flag || ~mask >> 2",
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.",
]


def main():
    tool, model, name = sys.argv[1:4]
    cases = []
    for text in TEXTS:
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", newline="", delete=False) as f:
            f.write(text)
        try:
            out = subprocess.run(
                [tool, "-m", model, "-f", f.name, "--ids", "--no-escape", "--log-disable"],
                check=True, capture_output=True, text=True,
            ).stdout
        finally:
            os.unlink(f.name)
        line = [l for l in out.splitlines() if l.startswith("[")][-1]
        cases.append({"text": text, "ids": json.loads(line)})
    root = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "tokenizer")
    with open(os.path.join(root, f"{name}.json"), "w", encoding="utf-8") as f:
        header = {"model": os.path.basename(model), "made_with": "llama-tokenize (llama.cpp 0c1e570)"}
        f.write(json.dumps(header, ensure_ascii=False)[:-1] + ', "cases": [\n')
        f.write(",\n".join(json.dumps(c, ensure_ascii=False) for c in cases))
        f.write("\n]}\n")


if __name__ == "__main__":
    main()
