"""Engine start-up and per-token decode time of SmolLM2-135M served by vLLM: its dense CPU
backend (CPU_ATTN) against vattention's backend (CUSTOM), in vLLM's own venv (see README,
"Serving with vLLM"; scripts/test_vllm.sh builds one):

    VATTENTION_CONFIG='{}' .venv-vllm/bin/python benchmarks/bench_vllm.py dense 7000
    VATTENTION_CONFIG='{}' .venv-vllm/bin/python benchmarks/bench_vllm.py vattention 7000

prints one RESULT line of JSON: the prompt length, start-up seconds, prefill seconds, the
per-token time of 64 greedy tokens after the first, and the tokens (compare the two runs
for agreement). Add VATTENTION_STATS=path for density and bytes. CPU times: they hold
for this machine only.
"""
import json
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vattention.models import smollm2
    from vattention.models.hf_export import smollm2_hf_dir

    backend, tokens = sys.argv[1], int(sys.argv[2])
    kwargs = dict(model=str(smollm2_hf_dir()), dtype="float32", enforce_eager=True,
                  max_model_len=8192, kv_cache_memory_bytes=1 << 30, seed=0, max_num_seqs=4)
    if backend != "dense":
        kwargs["attention_config"] = {"backend": "CUSTOM"}
    start = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - start
    ids = llm.get_tokenizer()(smollm2.real_text(tokens * 7))["input_ids"][:tokens]
    prompt = TokensPrompt(prompt_token_ids=ids)
    seconds = {}
    for n in (1, 65):
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        llm.generate([prompt], params, use_tqdm=False)   # warm-up
        start = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)
        seconds[n] = time.perf_counter() - start
    print("RESULT", json.dumps({
        "backend": backend, "prompt": len(ids), "start_s": startup, "prefill_s": seconds[1],
        "per_token_ms": (seconds[65] - seconds[1]) / 64 * 1000,
        "tokens": list(out[0].outputs[0].token_ids)}))


if __name__ == "__main__":   # vLLM's engine core is a spawned process
    main()
