"""GGUF exports run in real llama.cpp (built from the PyPI source by ``make llamacpp``) as the HF model runs.

Tiny pruned llama/mistral/qwen2 models have a skipped attention in layer 0 (a zero placeholder group in
the GGUF), a skipped MLP behind a kept attention (a zero placeholder channel), an emptied layer
(dropped, or kept for its output biases) and output biases; Qwen2 has q/k/v biases and Llama o/down
biases. Pruned SmolLM2 (20%, from the shared calibration) is checked for logits, tokenization of
the whole test.txt, perplexity, quantized perplexity and greedy completion.

Tolerances: llama.cpp computes in float32 with its own summation order (and a float32 KV cache here),
so logits agree with the float32 HF model to float32 rounding through the layers, not bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CASES, pruned_model, tiny_model

from gp_lightning.export import llamacpp_run
from gp_lightning.export.checkpoint import save_checkpoint
from gp_lightning.export.gguf_writer import export_gguf
from gp_lightning.export.llamacpp_build import LlamaCpp, require
from gp_lightning.runtime.errors import ModelSourceError

VOCAB = 49152  # SmolLM2's tokenizer: a GGUF carries a real one


@pytest.fixture(scope="session")
def llamacpp() -> LlamaCpp:
    return require()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def hf_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def assert_logits_close(got: np.ndarray, expected: np.ndarray, relative: float) -> None:
    """Every logit within ``relative`` of the largest logit magnitude, and the same argmax everywhere."""
    scale = float(np.abs(expected).max())
    worst = float(np.abs(got - expected).max())
    assert worst <= relative * scale, f"max |llama.cpp - HF| = {worst:.3g} > {relative} x {scale:.3g}"
    assert np.array_equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("arch", sorted(CASES))
def test_pruned_tiny_model_runs_in_llamacpp_as_in_transformers(arch: str, tmp_path: Path, llamacpp: LlamaCpp,
                                                                smollm2_tokenizer: object) -> None:
    model = pruned_model(arch, dtype=torch.float32, vocab=VOCAB, sliding_window=None)
    save_checkpoint(model, smollm2_tokenizer, tmp_path / "model")
    done = export_gguf(tmp_path / "model", tmp_path / "model.gguf", "f32")
    # llama: layer 2 is empty but for its output biases (placeholders); the others dropped it
    assert done.layers == (4 if arch == "llama" else 3) and done.arch == "deci"
    ids = [int(i) for i in torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(1))]
    assert_logits_close(llamacpp_run.logits(llamacpp, done.path, ids), hf_logits(model, ids), 1e-5)


def test_dense_model_runs_in_llamacpp_as_in_transformers(tmp_path: Path, llamacpp: LlamaCpp,
                                                         smollm2_tokenizer: object) -> None:
    model = tiny_model("qwen2", gqa=2, num_kv=3, vocab=VOCAB, tie_word_embeddings=True)
    save_checkpoint(model, smollm2_tokenizer, tmp_path / "model")
    done = export_gguf(tmp_path / "model", tmp_path / "model.gguf", "f32")
    assert done.arch == "llama"  # uniform layers: the plain architecture every GGUF runtime has
    ids = list(range(100, 120))
    assert_logits_close(llamacpp_run.logits(llamacpp, done.path, ids), hf_logits(model, ids), 1e-5)


def test_a_sliding_window_llamacpp_ignores_is_refused_unless_the_context_fits(tmp_path: Path,
                                                                             smollm2_tokenizer: object) -> None:
    model = pruned_model("mistral", dtype=torch.float32, vocab=VOCAB)  # sliding_window=5
    save_checkpoint(model, smollm2_tokenizer, tmp_path / "model")
    with pytest.raises(ModelSourceError, match="sliding window of 5 tokens.*--context_length 5"):
        export_gguf(tmp_path / "model", tmp_path / "model.gguf", "f32")
    assert not (tmp_path / "model.gguf").exists()
    assert export_gguf(tmp_path / "model", tmp_path / "model.gguf", "f32", context_length=5).layers == 3


@pytest.fixture(scope="module")
def smollm2_ggufs(tmp_path_factory: pytest.TempPathFactory, smollm2_pruned: tuple[Path, dict]) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {kind: export_gguf(smollm2_pruned[0], out / f"pruned-{kind}.gguf", kind).path for kind in ("f32", "f16", "q8_0")}


@pytest.fixture(scope="module")
def smollm2_model(smollm2_pruned: tuple[Path, dict]) -> torch.nn.Module:
    from gp_lightning.export.checkpoint import load_pruned

    return load_pruned(smollm2_pruned[0], dtype=torch.float32)


CONTEXT, CHUNKS = 128, 8


@pytest.fixture(scope="module")
def test_ids(smollm2_tokenizer: object, wikitext: Path) -> list[int]:
    """The HF tokenizer's ids of the whole test.txt."""
    return smollm2_tokenizer((wikitext / "test.txt").read_text(encoding="utf-8")).input_ids


def test_pruned_smollm2_logits_and_tokenization_match(llamacpp: LlamaCpp, smollm2_ggufs: dict[str, Path],
                                                      smollm2_model: torch.nn.Module, test_ids: list[int],
                                                      wikitext: Path) -> None:
    test_file = wikitext / "test.txt"
    ours = test_ids
    theirs = llamacpp_run.tokenize(llamacpp, smollm2_ggufs["f32"], test_file)
    assert len(theirs) == len(ours) and theirs == ours
    ids = ours[1000:1064]
    assert_logits_close(llamacpp_run.logits(llamacpp, smollm2_ggufs["f32"], ids), hf_logits(smollm2_model, ids), 1e-4)


def chunk_perplexity(model: torch.nn.Module, ids: list[int], context: int, chunks: int) -> float:
    """llama-perplexity's protocol: chunks of ``context`` tokens, each scored on its second half."""
    first, nll, count = context // 2, 0.0, 0
    with torch.no_grad():
        for c in range(chunks):
            chunk = torch.tensor([ids[c * context : (c + 1) * context]])
            logp = torch.log_softmax(model(input_ids=chunk).logits[0].double(), -1)
            targets = chunk[0, first + 1 :]
            nll -= float(logp[first:-1].gather(1, targets[:, None]).sum())
            count += len(targets)
    return math.exp(nll / count)


def test_pruned_smollm2_perplexity_and_quantized_files_in_llamacpp(
        llamacpp: LlamaCpp, smollm2_ggufs: dict[str, Path], smollm2_model: torch.nn.Module, test_ids: list[int],
        wikitext: Path, tmp_path: Path) -> None:
    test_file = wikitext / "test.txt"
    ours = chunk_perplexity(smollm2_model, test_ids, CONTEXT, CHUNKS)
    ppl = {kind: llamacpp_run.perplexity(llamacpp, path, test_file, CONTEXT, CHUNKS) for kind, path in smollm2_ggufs.items()}
    q4 = tmp_path / "pruned-q4_k_m.gguf"
    llamacpp_run.quantize(llamacpp, smollm2_ggufs["f16"], q4, "Q4_K_M")
    ppl["q4_k_m"] = llamacpp_run.perplexity(llamacpp, q4, test_file, CONTEXT, CHUNKS)
    print(f"pruned SmolLM2 PPL ({CHUNKS} x {CONTEXT}): ours {ours:.4f}, llama.cpp " +
          ", ".join(f"{k} {v:.4f}" for k, v in ppl.items()))
    # measured on 12 chunks: ours 35.866, llama.cpp f32 35.867, f16 35.870, q8_0 35.880, Q4_K_M 36.805
    assert abs(ppl["f32"] / ours - 1) < 0.01
    assert abs(ppl["f16"] / ppl["f32"] - 1) < 0.002  # f16 weights: rounding only
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) < 0.01  # 8-bit blocks
    assert 0 < ppl["q4_k_m"] / ppl["f32"] - 1 < 0.1  # 4-bit: a real but bounded loss


def test_pruned_smollm2_greedy_completion_matches(llamacpp: LlamaCpp, smollm2_ggufs: dict[str, Path],
                                                  smollm2_model: torch.nn.Module, smollm2_tokenizer: object) -> None:
    prompt = "The history of the city begins"
    ids = smollm2_tokenizer(prompt, return_tensors="pt").input_ids
    out = smollm2_model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=smollm2_tokenizer.eos_token_id)
    expected = smollm2_tokenizer.decode(out[0, ids.shape[1] :])
    got = llamacpp_run.complete(llamacpp, smollm2_ggufs["f32"], prompt, 16)
    assert got == expected, (got, expected)
