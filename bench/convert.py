"""Streaming conversion benchmark: ``zeda convert`` on a sharded checkpoint at Qwen3-30B-A3B layer shapes.

Builds a synthetic Qwen3-MoE checkpoint with the real layer shapes (hidden 2048, 128 experts of
intermediate 768, top-8, 32 query / 4 key-value heads of 128) but few layers and a small
vocabulary, in bf16 and the hub's per-expert layout (``mlp.experts.{e}.gate_proj.weight``), as
safetensors shards written directly (no HF model is instantiated at that size). Then it runs
``zeda convert`` on it in a child process and records the wall time, bytes/s and the child's peak
RSS (``ru_maxrss`` from ``wait4``) against the largest shard and the checkpoint size. The same
child measurement of ``import zeda_cli.main`` alone gives the part of the peak that is the
interpreter, torch and transformers. Temporary files go under ``build/`` and are deleted.

    python bench/convert.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from safetensors.torch import save_file

from zeda_core.atomic import publish_benchmark
from zeda_core.checkpoint import WEIGHTS_INDEX, empty_model
from zeda_core.families import FAMILIES

MARKER = "bench:convert:cpu"
ACCEPT_RSS_BYTES = 1.2e9
QWEN3_30B_A3B_LAYER = dict(
    hidden_size=2048,
    moe_intermediate_size=768,
    intermediate_size=6144,
    num_experts=128,
    num_experts_per_tok=8,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    norm_topk_prob=True,
    tie_word_embeddings=False,
    dtype="bfloat16",
)
_LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as out:
    json.dump({"ru_maxrss_kb": usage.ru_maxrss}, out)
sys.exit(os.waitstatus_to_exitcode(status))
"""
_EXPERTS = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)$")


def checkpoint_config(layers: int, vocab_size: int) -> dict:
    """config.json of the synthetic model: Qwen3-30B-A3B's layer shapes, ``layers`` layers."""
    config = FAMILIES["qwen3_moe"].tiny_config(
        **QWEN3_30B_A3B_LAYER, num_hidden_layers=layers, vocab_size=vocab_size, max_position_embeddings=4096
    )
    return config.to_dict()


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint in the hub's per-expert layout, in layer order: name -> shape.

    Shapes come from the model built on the meta device; fused experts ``gate_up_proj`` [N, 2I, H]
    and ``down_proj`` [N, H, I] become N x (``gate_proj``, ``up_proj`` [I, H]; ``down_proj`` [H, I]).
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for key, tensor in empty_model(config).state_dict().items():
        match = _EXPERTS.match(key)
        if match is None:
            shapes[key] = tuple(tensor.shape)
            continue
        num, rows, cols = tensor.shape
        for e in range(num):
            if match["proj"] == "gate_up_proj":
                shapes[f"{match['prefix']}.{e}.gate_proj.weight"] = (rows // 2, cols)
                shapes[f"{match['prefix']}.{e}.up_proj.weight"] = (rows // 2, cols)
            else:
                shapes[f"{match['prefix']}.{e}.down_proj.weight"] = (rows, cols)
    return shapes


def write_checkpoint(path: Path, config: dict, shard_bytes: int, seed: int) -> dict[str, int]:
    """Write the synthetic bf16 checkpoint (random N(0, 0.02) weights) in shards of about ``shard_bytes``.

    Returns:
        ``{"bytes": tensor bytes, "shards": shard count, "largest_shard": bytes, "largest_tensor": bytes}``.
    """
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generator = torch.Generator().manual_seed(seed)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in tensor_shapes(config).items():
        nbytes = 2 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((key, shape))
        size += nbytes
    weight_map, shard_sizes, largest_tensor = {}, [], 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {key: (torch.randn(shape, generator=generator) * 0.02).bfloat16() for key, shape in group}
        save_file(tensors, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        shard_sizes.append(sum(t.nbytes for t in tensors.values()))
        largest_tensor = max(largest_tensor, *(t.nbytes for t in tensors.values()))
    index = {"metadata": {"total_size": sum(shard_sizes)}, "weight_map": weight_map}
    (path / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return {
        "bytes": sum(shard_sizes),
        "shards": len(groups),
        "largest_shard": max(shard_sizes),
        "largest_tensor": largest_tensor,
    }


def run_child(command: list[str]) -> dict:
    """Run ``command``; its wall time, peak RSS (bytes, ``ru_maxrss``) and stdout. Raises on failure.

    The command is forked from a small launcher, not from this process: Linux carries the peak RSS
    of the address space a process was forked (or vforked) from into its ``ru_maxrss``, and this
    process is large after writing the checkpoint.
    """
    start = time.perf_counter()
    with tempfile.NamedTemporaryFile("r", suffix=".json") as usage:
        done = subprocess.run(
            [sys.executable, "-S", "-c", _LAUNCHER, usage.name, *command], stdout=subprocess.PIPE, text=True
        )
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{shlex.join(command)} failed with exit code {done.returncode}")
        peak_kb = json.loads(usage.read())["ru_maxrss_kb"]
    return {"wall_s": wall, "peak_rss": peak_kb * 1024, "stdout": done.stdout}


def measure(work: Path, layers: int, vocab_size: int, zero_experts: int, shard_bytes: int, seed: int) -> dict:
    source, out = work / "source", work / "zeda"
    start = time.perf_counter()
    built = write_checkpoint(source, checkpoint_config(layers, vocab_size), shard_bytes, seed)
    build_s = time.perf_counter() - start
    baseline = run_child([sys.executable, "-c", "import zeda_cli.main"])
    convert = [sys.executable, "-m", "zeda_cli.main", "convert", "--model", str(source)]
    converted = run_child([*convert, "--zero-experts", str(zero_experts), "--out", str(out), "--seed", str(seed)])
    convert_s = float(re.search(r"GB in ([\d.]+) s\)", converted["stdout"])[1])
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {
        **built,
        "layers": layers,
        "vocab_size": vocab_size,
        "zero_experts": zero_experts,
        "build_s": build_s,
        "import_peak_rss": baseline["peak_rss"],
        "peak_rss": converted["peak_rss"],
        "wall_s": converted["wall_s"],
        "convert_s": convert_s,
        "bytes_written": written,
        "summary": converted["stdout"].strip(),
    }


def markdown(r: dict, command: str) -> str:
    gb, mb = 1e9, 1e6
    ok = r["peak_rss"] < ACCEPT_RSS_BYTES
    return "\n".join(
        [
            f"<!-- {MARKER} -->",
            f"## Streaming conversion: `zeda convert` at Qwen3-30B-A3B layer shapes "
            f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "",
            f"Command: `{command}` ({date.today().isoformat()}). Synthetic Qwen3-MoE checkpoint written "
            f"directly with safetensors: real layer shapes (hidden 2048, 128 experts of intermediate 768, top-8, "
            f"32/4 heads of 128) but only **{r['layers']} layers** and a **{r['vocab_size']:,}-token vocabulary** "
            f"(Qwen3-30B-A3B: 48 layers, 151,936 tokens), bf16, per-expert hub layout, {r['shards']} shards. "
            f"Converted with `--zero-experts {r['zero_experts']} --init gaussian` in a child process. The source "
            "had just been written, so it was read from the page cache; each output shard is fsynced.",
            "",
            "| checkpoint | shards | largest shard | largest tensor | written | conversion | throughput "
            "| child wall | peak RSS | of which imports |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| {r['bytes'] / gb:.2f} GB | {r['shards']} | {r['largest_shard'] / mb:.0f} MB "
            f"| {r['largest_tensor'] / mb:.0f} MB | {r['bytes_written'] / gb:.2f} GB | {r['convert_s']:.1f} s "
            f"| {r['bytes_written'] / r['convert_s'] / mb:.0f} MB/s | {r['wall_s']:.1f} s "
            f"| **{r['peak_rss'] / mb:.0f} MB** | {r['import_peak_rss'] / mb:.0f} MB |",
            "",
            f"Peak RSS is {r['peak_rss'] / r['bytes']:.0%} of the checkpoint and "
            f"{r['peak_rss'] / r['largest_shard']:.2f}x the largest shard; "
            f"{r['import_peak_rss'] / mb:.0f} MB of it is `import zeda_cli.main` alone (Python, torch, "
            f"transformers), so the conversion itself added {(r['peak_rss'] - r['import_peak_rss']) / mb:.0f} MB, "
            f"against a {r['largest_tensor'] / mb:.0f} MB largest tensor. Memory does not grow with the number "
            "of layers or shards (only the new router rows, (N+Z) x H per layer, are held). "
            f"Acceptance (peak RSS < {ACCEPT_RSS_BYTES / gb:.1f} GB): **{'met' if ok else 'missed'}**. "
            f"Conversion time is the `written ... in` time `zeda convert` prints; child wall adds the imports.",
            f"<!-- /{MARKER} -->",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (2: about 2.5 GB in bf16)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--zero-experts", type=int, default=64, help="Z (the rule N/2)")
    parser.add_argument("--shard-mb", type=int, default=500, help="source shard size, MB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("build"), help="temporary files go under this folder")
    parser.add_argument("--write", type=Path, help="write the section of this Markdown file (BENCHMARKS.md)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    command = shlex.join(["python", "bench/convert.py", *sys.argv[1:]])
    args.work.mkdir(parents=True, exist_ok=True)
    work = args.work / f"bench-convert-{os.getpid()}"
    try:
        results = measure(work, args.layers, args.vocab_size, args.zero_experts, args.shard_mb * 10**6, args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    publish_benchmark(markdown(results, command), MARKER, results, args.json, args.write)
    return 0 if results["peak_rss"] < ACCEPT_RSS_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
