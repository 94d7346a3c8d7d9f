"""Run llama.cpp's tools on a GGUF and read their answers: logits, tokens, perplexity, completions, speed.

These are what the GGUF export is checked against (the HF model's logits, tokenizer, perplexity and
greedy generation) and what ``bench/speed.py`` measures. Every tool that runs the model gets this machine's
llama.cpp run flags (:meth:`~gp_lightning.runtime.machine.Machine.llamacpp_run_flags`: ``--no-repack`` on AMX
CPUs, whose AMX buffer type crashes on q8_0), in that tool's spelling.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from gp_lightning.export.llamacpp_build import LOGITS_TOOL, LlamaCpp
from gp_lightning.runtime.errors import GPLightningError
from gp_lightning.runtime.machine import detect

_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+)")


def _run(cmd: list[str | Path], timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run a llama.cpp tool; a failure is one error naming the tool and the end of what it printed."""
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise GPLightningError(f"{Path(str(cmd[0])).name} failed ({done.returncode}): {' | '.join(tail)}")
    return done


def _command(cpp: LlamaCpp, tool: str, *args: str | Path) -> list[str | Path]:
    """``tool`` with ``args``, then this machine's run flags (``llama-bench`` has its own parser and spelling)."""
    machine = detect()
    flags = machine.llamacpp_bench_flags() if tool == "llama-bench" else machine.llamacpp_run_flags()
    return [cpp.tool(tool), *args, *flags]


def _threads(threads: int | None) -> str:
    """``threads``, or one per core this process may use (the machine's ``cores``)."""
    return str(threads or detect().cores)


def _output(cmd: list[str | Path], timeout: float = 1800) -> str:
    """What a llama.cpp tool printed on both streams (its results and its log share them)."""
    done = _run(cmd, timeout)
    return done.stdout + done.stderr


def logits(cpp: LlamaCpp, gguf: Path, ids: list[int], threads: int | None = None) -> np.ndarray:
    """float32 logits of every position of ``ids`` (one sequence), n_tokens x n_vocab."""
    with tempfile.TemporaryDirectory() as tmp:
        tokens, out = Path(tmp) / "ids.bin", Path(tmp) / "logits.bin"
        np.asarray(ids, dtype=np.int32).tofile(tokens)
        _run(_command(cpp, LOGITS_TOOL, gguf, tokens, out, _threads(threads)))
        values = np.fromfile(out, dtype=np.float32)
    return values.reshape(len(ids), -1)


def tokenize(cpp: LlamaCpp, gguf: Path, text_file: Path) -> list[int]:
    """llama.cpp's token ids of a file's text (with BOS only if the GGUF says the tokenizer adds one)."""
    out = _output(_command(cpp, "llama-tokenize", "-m", gguf, "-f", text_file, "--ids", "--log-disable"))
    start, end = out.rfind("["), out.rfind("]")
    return [int(x) for x in out[start + 1 : end].split(",") if x.strip()]


def perplexity(cpp: LlamaCpp, gguf: Path, text_file: Path, context: int, chunks: int, threads: int | None = None) -> float:
    """``llama-perplexity`` with its default settings (flash attention where it can, f16 KV cache): chunks of
    ``context`` tokens, each scored on its second half."""
    out = _output(_command(cpp, "llama-perplexity", "-m", gguf, "-f", text_file, "-c", str(context), "-b",
                           str(context), "--chunks", str(chunks), "-t", _threads(threads)))
    found = _PPL.search(out)
    if found is None:
        raise GPLightningError(f"llama-perplexity printed no estimate: {out.strip().splitlines()[-3:]}")
    return float(found.group(1))


def complete(cpp: LlamaCpp, gguf: Path, prompt: str, tokens: int, threads: int | None = None) -> str:
    """Greedy continuation of ``prompt`` (the generated text only), all float32 (no f16 cache, no flash attention):
    a near-tie between two tokens must not flip on rounding."""
    out = _run(_command(cpp, "llama-completion", "-m", gguf, "-p", prompt, "-n", str(tokens), "--temp", "0",
                        "--top-k", "1", "-no-cnv", "--no-display-prompt", "--simple-io", "--ignore-eos", "-t",
                        _threads(threads), "-ctk", "f32", "-ctv", "f32", "-fa", "off", "--no-warmup"), timeout=600)
    return out.stdout.removesuffix("\n\n")  # the tool ends its output with two newlines of its own


def speed(cpp: LlamaCpp, gguf: Path, prompt_tokens: int, new_tokens: int, threads: int | None = None, repetitions: int = 3
          ) -> dict[str, float]:
    """``llama-bench`` prefill and decode throughput (tokens/s)."""
    out = _output(_command(cpp, "llama-bench", "-m", gguf, "-p", str(prompt_tokens), "-n", str(new_tokens),
                           "-t", _threads(threads), "-r", str(repetitions), "-o", "json"))
    rows = json.loads(out[out.index("[") : out.rindex("]") + 1])
    result = {}
    for row in rows:
        key = "prefill" if row.get("n_prompt", 0) else "decode"
        result[key] = float(row["avg_ts"])
    return result


def quantize(cpp: LlamaCpp, source: Path, target: Path, kind: str, threads: int | None = None) -> Path:
    """``llama-quantize`` ``source`` into ``target`` (e.g. Q4_K_M): no run flags, it runs no model (nor has the option)."""
    _run([cpp.tool("llama-quantize"), source, target, kind, _threads(threads)])
    return target
