"""Per-forward matmul time of the kernels vs the float path, on SmolLM2-135M's shapes.

    python -m kvlm.bench.kernels --threads 1,2 --rows 1,16,64,512

30 layers of distinct random Q4_1 weights (qkv 960x576, o 576x576, gate/up 3072x576, down
576x1536: the weights stream from memory as in a real forward) plus a 49152x576 Q8_0 lm_head,
each through `Linear` with a quantized weight (each SIMD path this CPU runs) and with the
same weights dequantized to float32 (today's float path). Paths are timed in one process,
interleaved, best and median of several forwards.
"""

from __future__ import annotations

import argparse
import time

import gguf
import torch

from kvlm.kernels import QuantizedTensor, available_paths, repack_gguf
from kvlm.kernels.build import SIMD_PATHS
from kvlm.models.layers import Linear

Q = gguf.GGMLQuantizationType
HIDDEN, INTERMEDIATE, VOCAB, NUM_LAYERS = 576, 1536, 49152, 30
LAYER_SHAPES = ((960, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE))


def _quantized(rows: int, cols: int, qtype: Q) -> QuantizedTensor:
    raw = gguf.quants.quantize((torch.randn(rows, cols) * 0.05).numpy(), qtype)
    return QuantizedTensor.from_plain(repack_gguf(raw, qtype, (rows, cols)))


class _Forward:
    """The matmuls of one forward, with weights as QuantizedTensor or dense float32."""

    def __init__(self, weights: list[QuantizedTensor], dense: bool, path: str | None) -> None:
        self.linears = [Linear(w.dequantize() if dense else w) for w in weights]
        self.path = path

    def __call__(self, num_rows: int) -> None:
        x, h = torch.randn(num_rows, HIDDEN), torch.randn(num_rows, INTERMEDIATE)
        for i, linear in enumerate(self.linears):
            rows = h if i % 4 == 3 else x  # ffn_down reads the intermediate activations
            if self.path is None:
                linear(rows)
            else:
                linear.weight.linear(rows, self.path)


def _time_ms(fn, num_rows: int, reps: int) -> tuple[float, float]:
    fn(num_rows)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(num_rows)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[0], times[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--rows", default="1,16,64,512", help="comma-separated row counts")
    parser.add_argument("--no-float", action="store_true", help="skip the float path")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    weights = [_quantized(r, c, Q.Q4_1) for _ in range(NUM_LAYERS) for r, c in LAYER_SHAPES]
    weights.append(_quantized(VOCAB, HIDDEN, Q.Q8_0))
    simd = [p for p in available_paths() if p in SIMD_PATHS]  # "ref" is far slower
    variants = {p: _Forward(weights, False, p) for p in simd}
    if not args.no_float:
        variants["float"] = _Forward(weights, True, None)
    print(f"paths: {', '.join(variants)}; torch threads as given")
    with torch.inference_mode():
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for num_rows in (int(m) for m in args.rows.split(",")):
                reps = max(3, min(20, 200 // num_rows))
                cells = []
                for name, forward in variants.items():
                    best, median = _time_ms(forward, num_rows, reps)
                    cells.append(f"{name} {best:.2f} ({median:.2f})")
                head = f"threads {threads}, rows {num_rows:>3}: ms best (median):"
                print(head, ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
