"""The tokenizer of a GGUF: byte-level BPE vocabulary, merges, token types, special ids, pre-tokenizer, chat template.

llama.cpp does not run a tokenizer.json: it reimplements each known pre-tokenizer under a name
(``tokenizer.ggml.pre``). The name is chosen here from the tokenizer.json's own pre-tokenizer (its
split regex and digit handling), so llama.cpp splits text exactly as the HF tokenizer does; a
pre-tokenizer we cannot name is an error rather than a GGUF that tokenizes differently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gp_lightning.runtime.errors import ModelSourceError

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")

#: The pre-tokenizer steps of tokenizer.json (as :func:`_steps` spells them) -> llama.cpp's name for them.
_PRE_TOKENIZERS = {
    (("bytelevel", _GPT2_REGEX),): "gpt-2",
    (("digits",), ("bytelevel", _GPT2_REGEX)): "smollm",
    (("split", _LLAMA3_REGEX), ("bytelevel", None)): "llama-bpe",
    (("split", _QWEN2_REGEX), ("bytelevel", None)): "qwen2",
}

# gguf.TokenType values
_NORMAL, _UNUSED, _CONTROL, _USER_DEFINED = 1, 5, 3, 4


def _steps(pre: dict[str, Any] | None) -> tuple[tuple[Any, ...], ...]:
    """The pre-tokenizer as comparable steps: ("digits",), ("split", regex), ("bytelevel", regex or None)."""
    if pre is None:
        return ()
    items = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    steps: list[tuple[Any, ...]] = []
    for item in items:
        kind = item.get("type")
        if kind == "Digits" and item.get("individual_digits"):
            steps.append(("digits",))
        elif kind == "Split" and item.get("behavior") == "Isolated" and not item.get("invert"):
            steps.append(("split", (item.get("pattern") or {}).get("Regex")))
        elif kind == "ByteLevel" and not item.get("add_prefix_space"):
            steps.append(("bytelevel", _GPT2_REGEX if item.get("use_regex", True) else None))
        else:
            steps.append(("unknown", json.dumps(item, sort_keys=True)))
    return tuple(steps)


def _tokenizer_json(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ModelSourceError(f"'{directory}' has no tokenizer.json; a GGUF carries its tokenizer: pass --tokenizer DIR "
                               "(the dense model's directory)")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise ModelSourceError(f"'{path}' is not a byte-level BPE tokenizer (Llama-3, Qwen2, SmolLM, GPT-2 style); "
                               "export-gguf writes only those")
    return data


def pre_tokenizer_name(data: dict[str, Any]) -> str:
    steps = _steps(data.get("pre_tokenizer"))
    normalizer = data.get("normalizer")
    name = _PRE_TOKENIZERS.get(steps)
    # NFC (Qwen2's): llama.cpp does not normalize, which only matters for text not already in NFC
    if name is None or normalizer not in (None, {}, {"type": "NFC"}):
        raise ModelSourceError(f"llama.cpp has no pre-tokenizer known to match this tokenizer.json ({steps}, normalizer "
                               f"{normalizer}); export-gguf knows {', '.join(sorted(set(_PRE_TOKENIZERS.values())))}")
    return name


def add_vocab(writer: Any, directory: Path, vocab_size: int) -> None:
    """Write the tokenizer of ``directory`` for a model with ``vocab_size`` embedding rows."""
    import gguf

    data = _tokenizer_json(directory)
    tokens: dict[int, str] = {i: t for t, i in data["model"]["vocab"].items()}
    types: dict[int, int] = dict.fromkeys(tokens, _NORMAL)
    for added in data.get("added_tokens") or []:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = _CONTROL if added.get("special") else _USER_DEFINED
    if max(tokens) >= vocab_size:
        raise ModelSourceError(f"the tokenizer has ids up to {max(tokens)}, but the model has only {vocab_size} embeddings")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(data))
    writer.add_token_list([tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    writer.add_token_types([types.get(i, _UNUSED) for i in range(vocab_size)])
    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ModelSourceError(f"'{directory / 'tokenizer.json'}' has no BPE merges")
    special.add_special_token = _adds_special_tokens(directory)  # what the HF tokenizer really does
    special.add_to_gguf(writer, quiet=True)


def _adds_special_tokens(directory: Path) -> dict[str, bool]:
    """Whether encoding text prepends BOS / appends EOS, as the HF tokenizer does it (llama.cpp's defaults differ)."""
    from transformers import PreTrainedTokenizerFast  # not AutoTokenizer: it would read a gp_pruned config.json

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory))
    ids = tokenizer("a").input_ids
    return {"bos": tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id}
