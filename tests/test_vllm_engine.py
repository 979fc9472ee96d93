"""End to end: vLLM engines on CPU with ``--all2all-backend deepep_v2`` through deepep-ops.

A tiny random-weight Mixtral-style model (hidden 256, 4 experts, top-2, 2
layers, written by the test with a local WordLevel tokenizer) is served by

- one DP=1 engine without expert parallel, eager: the reference;
- two engine processes, DP=2 + expert parallel + ``deepep_v2`` (offline SPMD,
  ``VLLM_DP_*``; each rank's worker in its engine process, ``uni`` executor, but
  for the opaque run: vLLM's default ``mp``, a worker process per rank), with
  the plugin's engine hooks (``DEEPEP_OPS_VLLM=1``):
  eager (``enforce_eager``: vLLM picks our prefill layout) and compiled
  (``VLLM_COMPILE``, Inductor: vLLM picks the decode layout), the latter with
  vLLM's CUDA-style opaque ``vllm::moe_forward`` forced on CPU, with and without
  ``DEEPEP_OPS_VLLM_UNWRAP_MOE=1``.

Default tier: the reference, the eager engines (prefill layout) and the
unwrapped compiled engines (decode layout), one engine run per layout; they
run in the background from the start of the session (``start_early``,
``tests/_dist.py``), while other test files run. The
exhaustive tier (``--exhaustive``, ``tests/tiers.py``) adds the opaque
``vllm::moe_forward`` run (``@pytest.mark.slow``).

Greedy tokens must equal the reference's. Where they differ, the reference
must have had a near tie there (top-2 logprob gap < ``TIE_NATS``: bf16 rounding
of the two layouts may pick either) and the rest of that sequence is not
compared; logprobs of compared tokens agree within ``LOGPROB_TOL``. Every
engine process must exit 0 within its time limit (process groups are killed
on timeout).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")

sys.path.insert(0, str(Path(__file__).parent))
import _dist  # noqa: E402
import vllm_tiny_model as tiny  # noqa: E402

#: bf16 tolerance: a greedy choice may flip where the reference's top-2 logprob gap is below this.
TIE_NATS = 0.3
#: bf16 tolerance on the logprob of an agreed token.
LOGPROB_TOL = 0.25
EAGER_TIMEOUT_S = 240
COMPILED_TIMEOUT_S = 360

_OP_RE = re.compile(r"torch\.ops\.(deepep_ops|vllm)\.(\w+)")

WALL: dict = {}


def _make_work() -> Path:
    d = Path(tempfile.mkdtemp(prefix="deepep_ops_vllm_engine_"))
    tiny.write_tiny_mixtral(d / "model")
    return d


def _outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except Exception as e:  # noqa: BLE001 - raised again by the fixture that needs it
        return "error", e


def _default_runs() -> dict:
    """The default tier's engine runs, in order: the reference with the eager DP=2 engines
    (at the same time), then the compiled DP=2 engines; each run's outcome on its own."""
    work = _make_work()
    return {"work": work, "eager": _outcome(_eager_runs, work), "compiled": _outcome(_compiled_unwrapped, work)}


def start_early() -> None:
    """Called by tests/conftest.py once collected: the engine runs go in the background."""
    _dist.start_early("test_vllm_engine", _default_runs)


def _unwrap(outcome):
    status, value = outcome
    if status == "error":
        raise value
    return value


@pytest.fixture(scope="module")
def runs(request):
    out = _dist.result_once("test_vllm_engine", _default_runs)
    failed = request.session.testsfailed
    yield out
    if request.session.testsfailed == failed:  # keep the engines' logs of a failed run
        shutil.rmtree(out["work"], ignore_errors=True)


@pytest.fixture(scope="module")
def work(runs):
    return runs["work"]


def _env(work: Path, name: str, **extra) -> dict:
    env = {
        # Cold compiles, and nothing shared with other runs.
        "VLLM_CACHE_ROOT": str(work / f"cache_{name}"),
        "VLLM_DISABLE_COMPILE_CACHE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_LOGGING_LEVEL": "INFO",
        # Engine core in the launching process (DP still runs its own DP group
        # and dummy batches there): one Python start-up less per rank.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    env.update(extra)
    return env


def _start(work: Path, name: str, *, dp_size: int, ep: bool, eager: bool, timeout: float, executor: str = "uni",
           **env):
    # executor="uni": each DP rank's worker runs in its engine process (with the engine
    # core there too, see _env): one vLLM process per rank instead of two, ~20 CPU-s
    # less per DP=2 run. The exhaustive tier's opaque run keeps vLLM's default ("mp").
    return name, tiny.Engines(
        work / "model", work / name, dp_size=dp_size, ep=ep, eager=eager,
        env_extra=_env(work, name, **env), timeout=timeout, extra_args=("--executor", executor),
    )


def _wait(started):
    name, engines = started
    results, wall, logs = engines.wait()
    WALL[name] = round(wall, 1)
    _dist.emit(f"\n[{name}] wall {wall:.1f}s, tokens {[r['tokens'] for r in results]}\n")
    return results, logs


def _run(work: Path, name: str, **kwargs):
    return _wait(_start(work, name, **kwargs))


def _by_prompt(results) -> dict:
    out = {}
    for r in results:
        for p, t, lp in zip(r["prompts"], r["tokens"], r["logprobs"]):
            out[p] = (t, lp)
    return out


def _compare(ref_results, got_results) -> int:
    """Assert greedy agreement up to bf16 near-ties; return the number of compared tokens."""
    ref, got = _by_prompt(ref_results), _by_prompt(got_results)
    assert sorted(ref) == sorted(got) == sorted(tiny.PROMPTS)
    compared = 0
    for prompt in tiny.PROMPTS:
        (rt, rlp), (gt, glp) = ref[prompt], got[prompt]
        for i, (a, b) in enumerate(zip(rt, gt)):
            if a != b:
                gap = rlp[i][0] - rlp[i][1]
                assert gap < TIE_NATS, (
                    f"prompt {prompt!r}: token {i} is {b}, reference {a} with a top-2 gap of {gap:.3f} nats "
                    f"(ref {rt}, got {gt})"
                )
                break
            assert abs(rlp[i][0] - glp[i][0]) < LOGPROB_TOL, (prompt, i, rlp[i], glp[i])
            compared += 1
    total = sum(len(ref[p][0]) for p in tiny.PROMPTS)
    assert compared >= total * 3 // 4, f"only {compared} of {total} tokens compared"
    return compared


def _reports(work: Path, name: str) -> list:
    reps = [json.loads(p.read_text()) for p in sorted(work.glob(f"{name}.report.*.json"))]
    assert len(reps) == 2, f"expected a report per worker, got {len(reps)}"
    return reps


def _graph_ops(logs) -> set:
    ops = set()
    for log in logs:
        ops |= {f"{ns}::{name}" for ns, name in _OP_RE.findall(Path(log).read_text())}
    return ops


def _eager_runs(work: Path):
    """The DP=1 reference and the DP=2 + EP eager engines, run at the same time (3 processes)."""
    ref = _start(work, "dp1_eager", dp_size=1, ep=False, eager=True, timeout=EAGER_TIMEOUT_S)
    name = "dp2_ep_eager"
    ep = _start(
        work, name, dp_size=2, ep=True, eager=True, timeout=EAGER_TIMEOUT_S,
        DEEPEP_OPS_VLLM="1", DEEPEP_OPS_VLLM_REPORT=str(work / f"{name}.report.{{pid}}.json"),
    )
    try:
        ref_results, _ = _wait(ref)
    except BaseException:
        ep[1].kill()
        raise
    ep_results, _ = _wait(ep)
    return ref_results, ep_results


@pytest.fixture(scope="module")
def eager_runs(runs):
    return _unwrap(runs["eager"])


@pytest.fixture(scope="module")
def reference(eager_runs):
    return eager_runs[0]


def test_dp2_ep_eager_prefill_layout(work, eager_runs):
    name = "dp2_ep_eager"
    reference, results = eager_runs
    _compare(reference, results)
    for rep in _reports(work, name):
        assert rep["installed"] and rep["buffers"] == ["ReferenceElasticBuffer"]
        assert rep["adapters"] and all(not a["use_cudagraph"] for a in rep["adapters"])  # prefill layout
        assert all(a["capacity"] == 64 and a["num_ranks"] == 2 for a in rep["adapters"])  # max_num_batched_tokens


@pytest.fixture(scope="module")
def compiled_unwrapped(runs):
    return _unwrap(runs["compiled"])


def _compiled_unwrapped(work: Path):
    name = "dp2_ep_compiled_unwrap"
    results, logs = _run(
        work, name, dp_size=2, ep=True, eager=False, timeout=COMPILED_TIMEOUT_S,
        DEEPEP_OPS_VLLM="1", DEEPEP_OPS_VLLM_REPORT=str(work / f"{name}.report.{{pid}}.json"),
        DEEPEP_OPS_VLLM_FORCE_OPAQUE_MOE="1", DEEPEP_OPS_VLLM_UNWRAP_MOE="1", TORCH_LOGS="graph_code",
    )
    return name, results, logs


def test_dp2_ep_compiled_decode_layout_unwrapped(work, reference, compiled_unwrapped):
    name, results, logs = compiled_unwrapped
    _compare(reference, results)
    ops = _graph_ops(logs)
    print(f"[{name}] graph ops: {sorted(ops)}")
    # vLLM's modular kernel calls prepare_async / finalize_async: the async pairs
    assert {"deepep_ops::dispatch_start", "deepep_ops::dispatch_wait", "deepep_ops::combine_start",
            "deepep_ops::combine_wait", "deepep_ops::token_bucket"} <= ops
    assert "vllm::moe_forward" not in ops
    reps = _reports(work, name)
    for rep in reps:
        assert rep["adapters"] and all(a["use_cudagraph"] for a in rep["adapters"])  # decode layout
    # The bucket is DP-global: both ranks bucketed the same DP counts, and some
    # step ran on a rank with fewer local tokens than the DP max.
    pairs = [p for rep in reps for p in rep["bucket_inputs"]]
    assert {dp for _, dp in reps[0]["bucket_inputs"]} == {dp for _, dp in reps[1]["bucket_inputs"]}
    assert any(local < dp for local, dp in pairs), pairs


@pytest.mark.slow
def test_dp2_ep_compiled_opaque_equals_unwrapped(work, reference, compiled_unwrapped):
    name = "dp2_ep_compiled_opaque"
    results, logs = _run(
        work, name, dp_size=2, ep=True, eager=False, timeout=COMPILED_TIMEOUT_S, executor="mp",
        DEEPEP_OPS_VLLM="1", DEEPEP_OPS_VLLM_FORCE_OPAQUE_MOE="1", TORCH_LOGS="graph_code",
    )
    ops = _graph_ops(logs)
    print(f"[{name}] graph ops: {sorted(ops)}")
    assert "vllm::moe_forward" in ops and "deepep_ops::dispatch" not in ops
    _compare(reference, results)
    _compare(compiled_unwrapped[1], results)
    print(f"\nengine wall times (s): {WALL}")


def test_engines_start_again_on_a_taken_port(tmp_path, monkeypatch):
    """A DP master port taken between picking and binding it (the ranks log "address
    already in use") costs one new start on another port, not a failed test; other
    failures still raise."""
    import subprocess

    ports = []

    def fake_launch(self, port):
        ports.append(port)
        taken = len(ports) == 1
        self.logs, self.procs, self.t0 = [], [], time.monotonic()
        for r in range(self.dp_size):
            log = tmp_path / f"r{r}.{len(ports)}.log"
            out = f"{self.out_prefix}.rank{r}.json"
            code = ("import sys; print('OSError: [Errno 98] Address already in use'); sys.exit(1)" if taken else
                    f"import json; json.dump({{'rank': {r}}}, open({out!r}, 'w'))")
            self.logs.append(str(log))
            with open(log, "w") as f:
                self.procs.append(subprocess.Popen([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    monkeypatch.setattr(tiny.Engines, "_launch", fake_launch)
    results, _, _ = tiny.Engines("model", tmp_path / "run", dp_size=2, ep=True, eager=True, timeout=60).wait()
    assert [r["rank"] for r in results] == [0, 1]
    assert len(ports) == 2, ports  # one start on a taken port, one on a fresh one

    def failing_launch(self, port):
        self.logs, self.procs, self.t0 = [str(tmp_path / "bad.log")], [], time.monotonic()
        with open(self.logs[0], "w") as f:
            self.procs.append(subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"], stdout=f,
                                               start_new_session=True))

    monkeypatch.setattr(tiny.Engines, "_launch", failing_launch)
    with pytest.raises(RuntimeError, match=r"exited with \[\(0, 3\)\]"):
        tiny.Engines("model", tmp_path / "bad", dp_size=1, ep=False, eager=True, timeout=60).wait()
