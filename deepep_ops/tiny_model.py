"""A tiny random-weight Mixtral-style MoE model that vLLM serves on a CPU, and a one-rank runner.

``python -m deepep_ops tiny-model DIR`` (:func:`write_tiny_mixtral`) writes
``config.json``, ``model.safetensors`` (bf16, about 2 MB) and a WordLevel
tokenizer whose words are ``w0`` … ``w249`` into ``DIR``; nothing is
downloaded. Shapes: hidden 256, 4 experts, top-2, 2 layers, intermediate 128,
vocabulary 256. They meet what vLLM's CPU experts and DeepEP's combine need:
bf16, ``hidden_size % 256 == 0`` (512-byte rows), intermediate a multiple of 32.
The weights are random: the model generates word salad, deterministically.

``python -m deepep_ops.tiny_model --model DIR --out OUT.json [--ep] [--eager]``
runs one vLLM engine (one DP rank in vLLM's offline SPMD mode: the
``VLLM_DP_*`` environment variables say which) that greedily generates from
:data:`PROMPTS` (rank ``r`` of ``n`` takes prompts ``r, r+n, …``) and writes its
tokens and logprobs as JSON. ``tests/test_vllm_engine.py`` and
``docs/vllm_engine.md`` run it.

Writing the model needs ``torch``, ``safetensors`` and ``tokenizers`` (vLLM
installs both); running it needs vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Optional

HIDDEN = 256  # DeepEP combine moves rows in 512-byte atoms: hidden % 256 == 0 for bf16
INTERMEDIATE = 128  # vLLM's CPU experts: a multiple of 32
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

#: Written beside the weights; its presence marks a directory this module may overwrite.
MARKER = "README.deepep-ops-tiny-model.txt"

#: What writing the model imports beyond torch (both come with vLLM).
NEEDS = ("safetensors", "tokenizers")


def missing_packages() -> list[str]:
    """The packages of :data:`NEEDS` that are not installed (nothing imported)."""
    import importlib.util

    return [name for name in NEEDS if importlib.util.find_spec(name) is None]


def check_target(path) -> Optional[str]:
    """Why ``path`` cannot take a tiny model (``None`` if it can): it must not exist,
    be an empty directory, or hold a tiny model written here before."""
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_dir():
        return f"{path} exists and is not a directory"
    if any(path.iterdir()) and not (path / MARKER).exists():
        return f"{path} is a non-empty directory that holds no tiny model written by deepep-ops"
    return None


def write_tiny_mixtral(path, seed: int = 0) -> Path:
    """Write a random-weight ``MixtralForCausalLM`` (bf16) with a local tokenizer into ``path``.

    The same ``seed`` writes the same weights. Returns ``path``.
    """
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
    (path / MARKER).write_text(
        f"Written by `python -m deepep_ops tiny-model` (seed {seed}): a random-weight Mixtral-style MoE\n"
        f"(hidden {HIDDEN}, {NUM_EXPERTS} experts, top-{TOP_K}, {NUM_LAYERS} layers) for trying vLLM on a CPU.\n"
        "Its words are w0 ... w249; it generates word salad.\n"
    )
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


def write_main(args: argparse.Namespace) -> int:
    """``python -m deepep_ops tiny-model DIR [--seed N]`` (options checked by :mod:`deepep_ops._cli`)."""
    t0 = time.perf_counter()
    path = write_tiny_mixtral(args.dir, seed=args.seed)
    size = sum(f.stat().st_size for f in path.iterdir()) / 2**20
    print(f"wrote a tiny Mixtral-style MoE model to {path} ({size:.1f} MB, seed {args.seed}, "
          f"{time.perf_counter() - t0:.1f} s): hidden {HIDDEN}, {NUM_EXPERTS} experts, top-{TOP_K}, "
          f"{NUM_LAYERS} layers, words w0 ... w{WORDS - 1}")
    return 0


# ------------------------------------------------------------------ runner


def build_parser() -> argparse.ArgumentParser:
    """The runner's options (``python -m deepep_ops.tiny_model``); imports nothing heavy."""
    from deepep_ops._cli import HelpFormatter, int_at_least

    parser = argparse.ArgumentParser(
        prog="python -m deepep_ops.tiny_model",
        description=(
            "Run one vLLM engine (one DP rank) on a tiny model written by 'python -m deepep_ops tiny-model DIR':\n"
            "greedy generation from the module's fixed prompts (rank r of n takes prompts r, r+n, ...),\n"
            "tokens and logprobs written to --out as JSON. With VLLM_DP_RANK, VLLM_DP_SIZE,\n"
            "VLLM_DP_MASTER_IP and VLLM_DP_MASTER_PORT set, each process is one rank of vLLM's\n"
            "offline SPMD data parallel; with --ep, DEEPEP_OPS_VLLM=1 runs deepep_v2 through deepep-ops."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="the model directory")
    parser.add_argument("--out", required=True, metavar="OUT.json", help="where to write the results")
    parser.add_argument("--eager", action="store_true",
                        help="enforce_eager (vLLM then picks DeepEP's prefill layout); otherwise vLLM compiles "
                             "(decode layout)")
    parser.add_argument("--ep", action="store_true",
                        help="enable_expert_parallel with all2all_backend='deepep_v2'")
    parser.add_argument("--max-tokens", type=int_at_least(1), default=6, metavar="N",
                        help="tokens generated per prompt")
    parser.add_argument("--max-num-batched-tokens", type=int_at_least(1), default=64, metavar="N",
                        help="vLLM's max_num_batched_tokens (the DeepEP buffer's capacity per rank)")
    parser.add_argument("--executor", choices=("uni", "mp"), default=None,
                        help="vLLM's distributed_executor_backend (default: vLLM's choice, mp for DP > 1); uni keeps "
                             "the worker in the engine process (with VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model: {args.model} holds no config.json "
                     "(write one with: python -m deepep_ops tiny-model DIR)")
    out_dir = Path(args.out).resolve().parent
    if not out_dir.is_dir():
        parser.error(f"--out: directory {out_dir} does not exist")
    return args


def main(argv=None) -> int:
    """One engine (one DP rank) generates greedily; results to ``--out``."""
    args = parse_args(argv)
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
    print(f"rank {rank}: {len(prompts)} prompts -> {result['tokens']} ({args.out})", flush=True)
    del llm
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
