"""Greedy decode and prefill on the CPU: cpmctl (eager and `--compile`) against llama.cpp, side by side.

    .venv/bin/python benchmarks/decode_vs_llamacpp.py --llama-cpp-src DIR [--rounds 3] [--new-tokens 128] [--out FILE]
        [--precisions fp32,bf16,int8,int4] [--threads 1] [--no-autotune]

Needs the `llamacpp` extra (`pip install -e '.[llamacpp]'`: llama-cpp-python, built from source)
and llama-cpp-python's unpacked source distribution (`pip download --no-binary :all: --no-deps
llama-cpp-python==0.3.36`, then untar), whose vendor/llama.cpp/convert_hf_to_gguf.py and gguf-py
convert the model (--llama-cpp-src, or the LLAMA_CPP_PYTHON_SRC environment variable).

One run:
1. makes a random Llama-shaped transformers model (default ~97M parameters: 12 layers, d 768,
   FFN 2048, vocabulary 8,000, untied output) with a SentencePiece vocabulary of its size (the
   converter wants one; the engines are fed token ids), imports it with `cpmctl.hf.import_hf`,
   and converts it to GGUF f32, f16, bf16 and q8_0 with llama.cpp's converter, then q4_0 with
   llama.cpp's own quantizer (`llama_model_quantize`);
2. runs each precision in a subprocess of its own (its models, compiled graphs and llama.cpp
   contexts; an earlier version compiled every precision in one process and stopped at dynamo's
   recompile limit): fp32 against llama.cpp f32, bf16 against bf16 and f16, cpmctl's int8 linear
   layers (`infer --dtype int8`: one scale per row) against q8_0, int4 (group 64, the default:
   4.5 bits per weight, as q4_0's 32-weight blocks) against q4_0;
   in fp32, checks that cpmctl (eager and compiled) and llama.cpp f32 generate the same greedy
   tokens from the same prompt ids (elsewhere, reports the share of tokens equal to fp32 cpmctl's);
3. times decode (`--new-tokens` after a 16-token prompt; each engine's clock from its first token
   to its last) in rounds that alternate the engines (order rotated every round), medians per
   engine and the median of per-round ratios;
4. times prefill of a 512-token prompt the same way;
5. measures the read bandwidth (a 1 GiB fp32 sum) and reports each decode as a fraction of the
   bound it implies (weight bytes read per token / bandwidth: every weight but the token embedding,
   cpmctl's from its tensors, llama.cpp's from the GGUF's tensor sizes).

Compile time is measured cold (a fresh inductor cache directory for this process, unless
--warm-cache) and warm (new compiled steps in the same process: dynamo traces again, inductor's
cache returns the code); break-even = cold compile seconds / (eager - compiled seconds per token).
Figures are printed as JSON as they come and written to --out before anything optional.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

GB = 1e9
PROMPT = 16
PREFILL = 512


def log(record: dict) -> None:
    print(json.dumps(record), flush=True)


# -- the model, in both formats ---------------------------------------------------------------------
def make_hf_llama(out: Path, args) -> None:
    import torch
    import transformers
    from sentencepiece import sentencepiece_model_pb2 as sp_model

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_ff, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=2048,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # every parameter random, at scales that keep activations O(1) and logits apart
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.2 if p.dim() == 1 else (0.5 if "embed" in name else p.shape[1] ** -0.5)))
            if p.dim() == 1:
                p.add_(1.0)
    model.save_pretrained(out)
    # A SentencePiece vocabulary of the model's size: <unk>, <s>, </s>, then plain pieces.
    proto = sp_model.ModelProto()
    for i in range(args.vocab):
        piece = proto.pieces.add()
        piece.piece, piece.score = {0: "<unk>", 1: "<s>", 2: "</s>"}.get(i, f"\u2581p{i}"), -float(i)
        piece.type = {0: 2, 1: 3, 2: 3}.get(i, 1)  # UNKNOWN, CONTROL, NORMAL
    proto.trainer_spec.model_type = 1  # unigram
    proto.trainer_spec.vocab_size = args.vocab
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())


def convert_gguf(src: Path, hf_dir: Path, out: Path, outtype: str) -> Path:
    converter = src / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    env = {**os.environ, "PYTHONPATH": str(src / "vendor" / "llama.cpp" / "gguf-py")}
    subprocess.run([sys.executable, str(converter), str(hf_dir), "--outfile", str(out), "--outtype", outtype],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return out


def quantize_gguf(source: Path, out: Path, ftype_name: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {out}")
    return out


# -- engines --------------------------------------------------------------------------------------------
def llama_context(path: Path, threads: int, *, repack: bool = True):
    """A llama.cpp context; `repack=False` loads the weights without llama.cpp's extra buffer types
    (the CPU backend's repacked q8_0/q4_0 layouts for AVX-512/AMX)."""
    import llama_cpp
    import llama_cpp.llama as binding

    defaults = llama_cpp.llama_model_default_params

    def without_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    if not repack:  # the binding has no argument for it: its default-params call, for this load only
        binding.llama_cpp.llama_model_default_params = without_repack
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=PREFILL, n_ubatch=PREFILL, n_threads=threads,
                               n_threads_batch=threads, verbose=False)
    finally:
        binding.llama_cpp.llama_model_default_params = defaults


class LlamaCpp:
    """Greedy decoding and prefill through llama-cpp-python.

    Quantized GGUFs (q8_0, q4_0): with its repacked weights this build (0.3.36, compiled here, on an
    AVX-512/AMX Xeon) crashes (SIGSEGV) evaluating any batch of more than one token, while one token
    at a time works. So `greedy` uses the repacked weights (llama.cpp's fastest decode) and feeds
    the prompt one token at a time (outside the decode clock), and `prefill` runs on a second
    context loaded without repacking."""

    def __init__(self, path: Path, threads: int, *, quantized: bool = False) -> None:
        self.llm = llama_context(path, threads)
        self.one_at_a_time = quantized
        self.batch_llm = llama_context(path, threads, repack=False) if quantized else self.llm

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        import numpy as np

        llm = self.llm
        llm.reset()
        for start in range(0, len(prompt), 1 if self.one_at_a_time else len(prompt)):
            llm.eval(prompt[start: start + (1 if self.one_at_a_time else len(prompt))])
        out = []
        for _ in range(n):
            # The binding keeps logits in `scores` only with logits_all; the context has the last row.
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
            token = int(np.argmax(logits))
            out.append(token)
            if len(out) == 1:
                decode_start = time.perf_counter()  # as cpmctl's generate: the tokens after the first
            if len(out) < n:
                llm.eval([token])
        self.decode_s = time.perf_counter() - decode_start
        return out

    def prefill(self, prompt: list[int]) -> None:
        self.batch_llm.reset()
        self.batch_llm.eval(prompt)


class Cpmctl:
    def __init__(self, model, compiled) -> None:
        self.model, self.compiled = model, compiled

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        import torch

        from cpmctl.generate import generate

        tokens, self.last_stats = generate(self.model, torch.tensor([prompt]), max_new_tokens=n, compiled=self.compiled)
        self.decode_s = self.last_stats["decode_s"]  # the tokens after the first
        return tokens[0].tolist()

    def prefill(self, prompt: list[int]) -> None:
        import torch

        from cpmctl.generate import prefill
        from cpmctl.model import KVCache

        ids = torch.tensor([prompt])
        with torch.inference_mode():
            if self.compiled is None:
                prefill(self.model, ids, KVCache.for_model(self.model, 1, len(prompt)))
            else:
                self.compiled.prefill(ids, self.compiled.allocate(1, len(prompt), max_position=len(prompt) - 1))


# -- timing ---------------------------------------------------------------------------------------------
def read_bandwidth_gbps() -> float:
    import torch

    x = torch.ones(2**28)  # 1 GiB of fp32
    x.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.nbytes / statistics.median(times) / GB


def rounds(engines: dict, work, n_rounds: int, seconds_of=None) -> dict[str, list[float]]:
    """Seconds of `work(engine)` (or `seconds_of(engine)` after it) per engine per round; the
    order rotates every round."""
    names = list(engines)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # untimed: any graph these shapes need is compiled here
        work(engines[name])
    for r in range(n_rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        if r % 2:
            order = order[::-1]
        for name in order:
            start = time.perf_counter()
            work(engines[name])
            took = time.perf_counter() - start
            seconds[name].append(took if seconds_of is None else seconds_of(engines[name]))
    return seconds


def summarise(seconds: dict[str, list[float]], units: int, reference: str) -> dict:
    """Median units/s per engine and the median per-round ratio of each to `reference`
    (> 1: faster than the reference)."""
    out = {}
    for name, times in seconds.items():
        out[name] = {"per_s": units / statistics.median(times),
                     f"ratio_vs_{reference}": statistics.median(r / t for r, t in zip(seconds[reference], times))}
    return out


PRECISIONS = {  # precision -> (cpmctl float dtype, cpmctl quantization (scheme, group), llama.cpp GGUF kinds)
    "fp32": ("float32", None, ["f32"]),
    "bf16": ("bfloat16", None, ["bf16", "f16"]),
    "int8": ("float32", ("int8", None), ["q8_0"]),
    "int4": ("float32", ("int4", 64), ["q4_0"]),
}


def gguf_weight_bytes(src: Path, path: Path) -> int:
    """Bytes of a GGUF's tensors other than the token embedding (what decoding reads per token)."""
    sys.path.insert(0, str(src / "vendor" / "llama.cpp" / "gguf-py"))
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if t.name != "token_embd.weight")


def cpmctl_weight_bytes(model) -> int:
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n.rpartition(".")[2] in ("qweight", "scales", "zeros"))]
    return sum(t.numel() * t.element_size() for n, t in tensors if n != "embed.tokens.weight")


def measure_precision(precision: str, work: Path, args, bandwidth: float) -> dict:
    """One precision's row: compile costs, decode and prefill rates of cpmctl (eager, compiled)
    and llama.cpp's GGUF kinds of that precision, in alternating rounds (run in its own process)."""
    import torch

    from cpmctl.checkpoint import load_model
    from cpmctl.compiled import CompiledDecoder
    from cpmctl.quant import set_cpu_gemv
    from cpmctl.quantize import quantize_linears

    torch.set_num_threads(args.threads)
    dtype_name, quant, gguf_kinds = PRECISIONS[precision]
    prompts = json.loads((work / "prompts.json").read_text())
    prompt, long_prompt = prompts["prompt"], prompts["long"]
    model, handle = load_model(work / "cpmctl", dtype=getattr(torch, dtype_name))
    handle.close()
    if quant is not None:
        quantize_linears(model, *quant, output=not args.float_output)
    row_notes = {"cpu_gemv": args.cpu_gemv, "quantized_output_projection": bool(quant and not args.float_output),
                 "cpu_gemv_fallback": set_cpu_gemv(model, args.cpu_gemv)}
    weight_bytes = cpmctl_weight_bytes(model)
    eager = Cpmctl(model, None)
    # Cold compile (a fresh inductor cache per run, unless --warm-cache): the prefill bucket and
    # decode graph of the timed generation, timed inside generate.
    compiled_steps = CompiledDecoder(model, autotune=args.autotune)
    compiled = Cpmctl(model, compiled_steps)
    start = time.perf_counter()
    compiled_tokens = compiled.greedy(prompt, args.new_tokens)
    cold = time.perf_counter() - start
    before = compiled_steps.stats.compile_s
    compiled.prefill(long_prompt)  # the 512 bucket's graph, compiled before timing
    cold_prefill_512 = compiled_steps.stats.compile_s - before
    warm_steps = CompiledDecoder(model, autotune=args.autotune)  # new code objects: dynamo traces, inductor's cache answers
    start = time.perf_counter()
    Cpmctl(model, warm_steps).greedy(prompt, args.new_tokens)
    warm = time.perf_counter() - start
    del warm_steps
    row: dict = {**row_notes, "weight_bytes_per_token": {"cpmctl": weight_bytes},
                 "compile": {"cold_s": cold, "cold_prefill_512_s": cold_prefill_512, "warm_s": warm,
                             "graphs": compiled_steps.stats.graphs, "autotune": args.autotune}}
    llama = {kind: LlamaCpp(work / f"model-{kind}.gguf", args.threads, quantized=kind.startswith("q")) for kind in gguf_kinds}
    for kind in gguf_kinds:
        row["weight_bytes_per_token"][f"llama_{kind}"] = gguf_weight_bytes(args.llama_cpp_src, work / f"model-{kind}.gguf")
    engines = {"cpmctl_eager": eager, "cpmctl_compiled": compiled, **{f"llama_{k}": llama[k] for k in gguf_kinds}}
    eager_tokens = eager.greedy(prompt, args.new_tokens)
    row["compiled_tokens_identical_to_eager"] = compiled_tokens == eager_tokens
    def agreement(reference: list[int]) -> dict[str, int]:
        """Per engine: greedy tokens equal to `reference` before the first difference (the same
        length as the timed runs, so no other cache bucket is compiled)."""
        out = {}
        for name, engine in engines.items():
            tokens = {"cpmctl_eager": eager_tokens, "cpmctl_compiled": compiled_tokens}.get(name) or engine.greedy(prompt, len(reference))
            out[name] = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))
        return out

    if precision == "fp32":
        row["tokens_equal_to_llama_f32_before_first_difference"] = agreement(llama["f32"].greedy(prompt, args.new_tokens))
        (work / "fp32_tokens.json").write_text(json.dumps(eager_tokens))
    elif (work / "fp32_tokens.json").exists():
        row["tokens_equal_to_cpmctl_fp32_before_first_difference"] = agreement(json.loads((work / "fp32_tokens.json").read_text()))
    log({precision: {"checks": {k: v for k, v in row.items() if "tokens" in k}}})
    reference = f"llama_{gguf_kinds[0]}"
    # Decode: each engine's own clock from its first token to its last (the prompt's prefill and
    # the first token excluded), in alternating rounds.
    decode = rounds(engines, lambda e: e.greedy(prompt, args.new_tokens), args.rounds, seconds_of=lambda e: e.decode_s)
    row["decode"] = summarise(decode, args.new_tokens - 1, reference)
    for name, figures in row["decode"].items():
        read = row["weight_bytes_per_token"]["cpmctl" if name.startswith("cpmctl") else name]
        figures["fraction_of_bandwidth_bound"] = figures["per_s"] * read / (bandwidth * GB)
    eager_s, compiled_s = (1 / row["decode"][n]["per_s"] for n in ("cpmctl_eager", "cpmctl_compiled"))
    row["compile"]["break_even_tokens"] = cold / (eager_s - compiled_s) if eager_s > compiled_s else None
    prefill = rounds(engines, lambda e: e.prefill(long_prompt), args.rounds)
    row["prefill_512"] = summarise(prefill, PREFILL, reference)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp-src", type=Path, default=os.environ.get("LLAMA_CPP_PYTHON_SRC"),
                        help="unpacked llama-cpp-python source distribution (for its converter)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16,int8,int4")
    parser.add_argument("--no-autotune", dest="autotune", action="store_false",
                        help="compile without max-autotune (inductor's default kernels; minutes less per precision)")
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's usual cache (compile time not cold)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cpu-gemv", default="auto", choices=("auto", "on", "off"),
                        help="cpmctl's C++ GEMV for decode-sized linear layers (int8/int4/bf16 weights): auto, on or off (torch's kernels)")
    parser.add_argument("--float-output", action="store_true",
                        help="int8/int4: keep the output projection fp32 (by default it is quantized too, as in llama.cpp's q8_0/q4_0 files)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # PRECISION:WORKDIR:BANDWIDTH, run by the parent
    args = parser.parse_args()
    if args.llama_cpp_src is None or not (Path(args.llama_cpp_src) / "vendor/llama.cpp/convert_hf_to_gguf.py").is_file():
        parser.error("--llama-cpp-src must be llama-cpp-python's unpacked source distribution (vendor/llama.cpp/convert_hf_to_gguf.py)")
    precisions = args.precisions.split(",")
    if unknown := [p for p in precisions if p not in PRECISIONS]:
        parser.error(f"unknown precision(s) {unknown}; expected some of {', '.join(PRECISIONS)}")
    if args.worker:
        precision, work, bandwidth = args.worker.split(":")
        row = measure_precision(precision, Path(work), args, float(bandwidth))
        (Path(work) / f"row-{precision}.json").write_text(json.dumps(row))
        return
    tmp = Path(tempfile.mkdtemp(prefix="decode-vs-llamacpp-"))

    import importlib.util

    import torch

    from cpmctl import hf

    torch.set_num_threads(args.threads)
    spec = importlib.util.spec_from_file_location("bench_machine", HERE / "machine.py")
    machine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(machine)
    results: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine.cpu_model(),
                     "threads": args.threads, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}

    def write() -> None:
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")

    hf_dir = tmp / "hf"
    make_hf_llama(hf_dir, args)
    hf.import_hf(hf_dir, tmp / "cpmctl")
    for kind in ("f32", "f16", "bf16", "q8_0"):
        convert_gguf(args.llama_cpp_src, hf_dir, tmp / f"model-{kind}.gguf", kind)
    quantize_gguf(tmp / "model-f32.gguf", tmp / "model-q4_0.gguf", "LLAMA_FTYPE_MOSTLY_Q4_0")
    results["bandwidth_read_gbps"] = read_bandwidth_gbps()
    log({"bandwidth_read_gbps": results["bandwidth_read_gbps"]})
    gen = torch.Generator().manual_seed(1)
    prompts = {"prompt": torch.randint(3, args.vocab, (PROMPT,), generator=gen).tolist(),
               "long": torch.randint(3, args.vocab, (PREFILL,), generator=gen).tolist()}
    (tmp / "prompts.json").write_text(json.dumps(prompts))

    argv = [a for a in sys.argv[1:]]
    for precision in precisions:
        env = dict(os.environ)
        if not args.warm_cache:  # a cold compile: a fresh inductor cache directory for each precision
            env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp / f"inductor-{precision}")
        started = time.perf_counter()
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv,
                               "--worker", f"{precision}:{tmp}:{results['bandwidth_read_gbps']}"], env=env)
        row_file = tmp / f"row-{precision}.json"
        if done.returncode != 0 or not row_file.exists():
            results[precision] = {"error": f"worker exited with {done.returncode}"}
        else:
            results[precision] = json.loads(row_file.read_text())
        results[precision]["process_s"] = time.perf_counter() - started
        log({precision: results[precision]})
        write()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
