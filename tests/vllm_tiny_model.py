"""A tiny random-weight Mixtral-style model for vLLM engine tests, and an engine runner.

``write_tiny_mixtral(path)`` writes config.json, model.safetensors and a
WordLevel tokenizer (built with the ``tokenizers`` package, nothing downloaded).

Run as a script, one vLLM engine (one DP rank) generates greedily and writes
its tokens as JSON::

    python tests/vllm_tiny_model.py --model DIR --out OUT.json [--eager] [--dp-rank R --dp-size N ...]

The DP settings come from the environment the parent sets (VLLM_DP_RANK,
VLLM_DP_SIZE, VLLM_DP_MASTER_IP, VLLM_DP_MASTER_PORT): vLLM's offline SPMD mode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

HIDDEN = 256  # DeepEP combine moves rows in 512-byte atoms: hidden % 256 == 0 for bf16
INTERMEDIATE = 128
NUM_EXPERTS = 4
TOP_K = 2
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 32
WORDS = 250
SPECIALS = ["<unk>", "<s>", "</s>"]
VOCAB = 256  # >= len(SPECIALS) + WORDS

#: Prompts of different lengths, so DP ranks get different token counts.
PROMPTS = [
    "w1 w2 w3 w4 w5",
    "w10 w20 w30",
    "w7 w8 w9 w10 w11 w12 w13 w14 w15",
    "w100 w101",
]


def write_tiny_mixtral(path, seed: int = 0) -> Path:
    """Write a random-weight MixtralForCausalLM (bf16) with a local tokenizer into ``path``."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HEAD_DIM,
        "num_local_experts": NUM_EXPERTS,
        "num_experts_per_tok": TOP_K,
        "vocab_size": VOCAB,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "router_aux_loss_coef": 0.0,
        "output_router_logits": False,
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))

    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    H, I, D = HIDDEN, INTERMEDIATE, HEAD_DIM
    w = {"model.embed_tokens.weight": rnd(VOCAB, H, std=1.0), "model.norm.weight": torch.ones(H, dtype=torch.bfloat16)}
    # A large-ish output projection: decisive greedy choices, so bf16 rounding
    # differences between layouts do not flip the argmax.
    w["lm_head.weight"] = rnd(VOCAB, H, std=0.5)
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        w[p + "post_attention_layernorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
        w[p + "self_attn.q_proj.weight"] = rnd(NUM_HEADS * D, H, std=H**-0.5)
        w[p + "self_attn.k_proj.weight"] = rnd(NUM_KV_HEADS * D, H, std=H**-0.5)
        w[p + "self_attn.v_proj.weight"] = rnd(NUM_KV_HEADS * D, H, std=H**-0.5)
        w[p + "self_attn.o_proj.weight"] = rnd(H, NUM_HEADS * D, std=(NUM_HEADS * D) ** -0.5)
        w[p + "block_sparse_moe.gate.weight"] = rnd(NUM_EXPERTS, H, std=1.0)
        for e in range(NUM_EXPERTS):
            q = f"{p}block_sparse_moe.experts.{e}."
            w[q + "w1.weight"] = rnd(I, H, std=H**-0.5)
            w[q + "w3.weight"] = rnd(I, H, std=H**-0.5)
            w[q + "w2.weight"] = rnd(H, I, std=I**-0.5)
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for j in range(WORDS):
        vocab[f"w{j}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 256, "add_bos_token": False,
    }))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return path


def dp_env(rank: int, size: int, port: int, threads_bind: str) -> dict:
    """Environment of one offline-SPMD DP rank on CPU."""
    return {
        "VLLM_DP_RANK": str(rank),
        "VLLM_DP_RANK_LOCAL": str(rank),
        "VLLM_DP_SIZE": str(size),
        "VLLM_DP_MASTER_IP": "127.0.0.1",
        "VLLM_DP_MASTER_PORT": str(port),
        "VLLM_CPU_OMP_THREADS_BIND": threads_bind,
    }


def prompts_for_rank(rank: int, size: int) -> list[str]:
    """Rank r takes prompts r, r+size, ...; together the ranks cover PROMPTS once."""
    return PROMPTS[rank::size]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (DeepEP prefill layout)")
    ap.add_argument("--ep", action="store_true", help="enable_expert_parallel with --all2all-backend deepep_v2")
    ap.add_argument("--max-tokens", type=int, default=6)
    ap.add_argument("--max-num-batched-tokens", type=int, default=64)
    ap.add_argument("--executor", choices=("uni", "mp"), default=None,
                    help="vLLM's distributed_executor_backend (default: vLLM's choice, mp for DP > 1); uni keeps "
                         "the worker in the engine process (with VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    from vllm import LLM, SamplingParams

    rank = int(os.environ.get("VLLM_DP_RANK", "0"))
    size = int(os.environ.get("VLLM_DP_SIZE", "1"))
    kwargs = dict(
        model=args.model,
        dtype="bfloat16",
        enforce_eager=args.eager,
        max_model_len=128,
        max_num_seqs=8,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=0,
        enable_prefix_caching=False,
    )
    if args.ep:
        kwargs.update(enable_expert_parallel=True, all2all_backend="deepep_v2")
    if args.executor:
        kwargs["distributed_executor_backend"] = args.executor
    if not args.eager:
        kwargs["compilation_config"] = {"mode": 3}  # VLLM_COMPILE
    llm = LLM(**kwargs)
    t_ready = time.monotonic()
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=2)
    prompts = prompts_for_rank(rank, size)
    outs = llm.generate(prompts, params, use_tqdm=False)
    result = {
        "rank": rank,
        "prompts": prompts,
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        # Per position: [logprob of the chosen token, best logprob of any other token].
        "logprobs": [
            [[lp[t].logprob, max((v.logprob for k, v in lp.items() if k != t), default=float("-inf"))]
             for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
            for o in outs
        ],
        "startup_s": t_ready - t0,
        "generate_s": time.monotonic() - t_ready,
    }
    Path(args.out).write_text(json.dumps(result))
    del llm
    return 0



def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Engines fail as hung past this many times their ``timeout`` even while using CPU.
HARD_LIMIT_FACTOR = 5

#: What a rank's log says when the DP master port was taken between picking and binding it.
_PORT_TAKEN = ("Address already in use", "EADDRINUSE")


class Engines:
    """``dp_size`` engine processes (offline SPMD DP), each in its own process group.

    Without ``port``, the DP master port is a free one picked by binding port 0;
    another process may take it before vLLM binds it, so a run whose ranks fail
    with "address already in use" is started again once on a new port.
    """

    def __init__(self, model, out_prefix, *, dp_size: int, ep: bool, eager: bool, env_extra=None,
                 timeout: float = 240.0, port: Optional[int] = None, extra_args=()):
        self.out_prefix, self.dp_size, self.timeout = out_prefix, dp_size, timeout
        self._cmd_args = (model, ep, eager, env_extra, extra_args)
        self._port_retries = 0 if port is not None else 1
        self._launch(_free_port() if port is None else port)

    def _launch(self, port: int) -> None:
        import subprocess

        model, ep, eager, env_extra, extra_args = self._cmd_args
        dp_size, out_prefix = self.dp_size, self.out_prefix
        bind = "|".join(str(r % (os.cpu_count() or 1)) for r in range(dp_size))
        self.procs, self.logs = [], []
        self.t0 = time.monotonic()
        for r in range(dp_size):
            env = dict(os.environ)
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            env.update(dp_env(r, dp_size, port, bind) if dp_size > 1 else {"VLLM_CPU_OMP_THREADS_BIND": "0"})
            env.update(env_extra or {})
            log = open(f"{out_prefix}.rank{r}.log", "w")
            self.logs.append(log.name)
            cmd = [sys.executable, __file__, "--model", str(model), "--out", f"{out_prefix}.rank{r}.json",
                   *(["--eager"] if eager else []), *(["--ep"] if ep else []), *extra_args]
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))
            log.close()

    def kill(self) -> None:
        import signal

        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            p.wait()

    def wait(self):
        """``(results, wall_s, logs)``; raises on a hang (after killing every group) or a non-zero exit.

        A hang: no engine process (or anything it started) used CPU for the
        stall limit (``tests/_dist.py``, ``DEEPEP_OPS_TEST_STALL_S``), or the run
        took over ``HARD_LIMIT_FACTOR`` × ``timeout`` (a loop that spins without
        finishing). A busy machine makes engines slow, not failed.
        """
        from _dist import ProgressWatch, stopping

        watch = ProgressWatch(lambda: [p.pid for p in self.procs], hard_s=HARD_LIMIT_FACTOR * self.timeout)
        try:
            while any(p.poll() is None for p in self.procs):
                why = "stopped: the test session ended" if stopping() else watch.check()
                if why is not None:
                    self.kill()
                    raise TimeoutError(f"engines {why} (expected within {self.timeout}s on an idle machine); "
                                       f"logs: {self.logs}")
                time.sleep(1.0)
        finally:
            # Engine children (workers) of an exited rank must not outlive it.
            self.kill()
        wall = time.monotonic() - self.t0
        bad = [(r, p.returncode) for r, p in enumerate(self.procs) if p.returncode != 0]
        if bad and self._port_retries > 0 and any(
            marker in Path(log).read_text(errors="replace") for log in self.logs for marker in _PORT_TAKEN
        ):
            self._port_retries -= 1
            self._launch(_free_port())
            return self.wait()
        if bad:
            raise RuntimeError(f"engine ranks exited with {bad}; logs: {self.logs}")
        results = [json.loads(Path(f"{self.out_prefix}.rank{r}.json").read_text()) for r in range(self.dp_size)]
        return results, wall, self.logs


def launch(model, out_prefix, **kwargs):
    """Start :class:`Engines` and wait for them."""
    return Engines(model, out_prefix, **kwargs).wait()


if __name__ == "__main__":
    sys.exit(main())
