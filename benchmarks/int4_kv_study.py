"""int4 KV schemes measured by fake quantization, on `kvlm eval ppl`'s text and chunks (issue 21).

The engine runs with a float32 cache; a `KVStore.write_hook` quantizes and dequantizes K/V in
place as each chunk is written, before attention reads it, so every scored token sees the
scheme's K/V exactly as a real store of that format would hand them back. Perplexity is
`kvlm eval ppl`'s: the same text (`read_text`), the first `--tokens` tokens, prefilled in
chunks of 256 through `token_logprobs`, with the default (GGUF kernel) weights. The float16
and today's int4 rows run the engine's own formats, as `kvlm eval ppl --kv-cache-dtype` does.

A scheme codes keys and values apart:
- per-token: groups of `g` values along head_dim share a scale (symmetric: absmax / 7, values
  in [-8, 7]; asymmetric: (max - min) / 15 and the min, values in [0, 15]), optionally after
  the head's Hadamard rotation (today's int4 is symmetric, g = 32, rotated);
- per-channel (KIVI): each channel's scale (and min) is shared by a group of `G` consecutive
  tokens, so a key group is coded once its G tokens are written.
Tokens not coded yet stay in full precision: the most recent `residual` tokens, plus those of a
key group not yet full. Scales and mins are float16 (`asym8`: an e4m3 scale and an int8 zero
point). `pre-rope` keys are coded before rope: the hook undoes each layer's rope, codes, redoes it.

Bytes per token per head count K and V (float16: 4 * head_dim), the full-precision tail at its
largest (residual + G - 1 tokens) spread over `--tokens` tokens.

    nice -n 10 python benchmarks/int4_kv_study.py --model smollm2 --tokens 4096 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass

import torch

from kvlm import LLM
from kvlm.attention.rope import RotaryEmbedding, apply_rope
from kvlm.cli.evaluate import DEFAULT_CHUNK_SIZE, read_text
from kvlm.engine.scoring import token_logprobs
from kvlm.kv.quant import MIN_SCALE, KVFormat, _hadamard
from kvlm.kv.store import KVStore

MODELS = {"smollm2": "smollm2", "gemma3": "gemma3-270m"}


@dataclass(frozen=True)
class PerToken:
    """Groups of `group` values along head_dim share a scale (and a min when asymmetric)."""

    group: int = 32
    symmetric: bool = True
    hadamard: bool = True
    today: bool = False  # run kvlm's own KVFormat("int4") round trip instead

    def tag(self) -> str:
        if self.today:
            return "today's int4"
        kind = "sym" if self.symmetric else "asym"
        return f"tok{self.group}-{kind}{'+H' if self.hadamard else ''}"

    def nbytes(self, head_dim: int) -> float:
        group = min(self.group, head_dim)
        return head_dim / 2 + head_dim / group * 2 * (1 if self.symmetric else 2)

    def code(self, x: torch.Tensor) -> torch.Tensor:  # [T, H, hd] -> same
        if self.today:
            fmt = KVFormat("int4", x.shape[-1])
            return fmt.dequantize(*fmt.quantize(x), torch.float32)
        group = min(self.group, x.shape[-1])
        y = rotate(x) if self.hadamard else x
        groups = y.unflatten(-1, (-1, group))  # [T, H, hd / g, g]
        out = fake_quant(groups, dim=-1, symmetric=self.symmetric).flatten(-2)
        return rotate(out) if self.hadamard else out


@dataclass(frozen=True)
class PerChannel:
    """KIVI keys: every channel's scale (and min) shared along `tokens` consecutive tokens."""

    tokens: int = 32
    symmetric: bool = False
    hadamard: bool = False
    pre_rope: bool = False  # coded before rope (the store would hold unroped keys)
    byte_scales: bool = False  # asymmetric only: an e4m3 scale and an int8 zero point

    def tag(self) -> str:
        kind = "sym" if self.symmetric else ("asym8" if self.byte_scales else "asym")
        return f"ch{self.tokens}-{kind}{'+H' if self.hadamard else ''}" + (
            " pre-rope" if self.pre_rope else ""
        )

    def nbytes(self, head_dim: int) -> float:
        if self.byte_scales:  # + one float16 scale of the scales per head and group
            return head_dim / 2 + (head_dim * 2 + 2) / self.tokens
        return head_dim / 2 + head_dim / self.tokens * 2 * (1 if self.symmetric else 2)

    def code(self, x: torch.Tensor) -> torch.Tensor:  # [T, H, hd], T a multiple of tokens
        y = rotate(x) if self.hadamard else x
        groups = y.unflatten(0, (-1, self.tokens))  # [T / G, G, H, hd]
        if self.byte_scales:
            out = byte_scale_quant(groups).flatten(0, 1)
        else:
            out = fake_quant(groups, dim=1, symmetric=self.symmetric).flatten(0, 1)
        return rotate(out) if self.hadamard else out


@dataclass(frozen=True)
class Full:
    """Not quantized (float16 bytes): isolates what the other half of K/V costs."""

    def tag(self) -> str:
        return "f16"

    def nbytes(self, head_dim: int) -> float:
        return 2 * head_dim

    def code(self, x: torch.Tensor) -> torch.Tensor:
        return x


Codec = PerToken | PerChannel | Full


@dataclass(frozen=True)
class Scheme:
    key: Codec
    value: Codec
    residual: int = 0  # most recent tokens kept in full precision
    jitter: int | None = None  # seed: K/V scaled by 1 + 1e-6 * N(0, 1) before coding

    @property
    def token_group(self) -> int:
        return self.key.tokens if isinstance(self.key, PerChannel) else 1

    @property
    def name(self) -> str:
        name = f"K {self.key.tag()} / V {self.value.tag()}"
        name += f" + R{self.residual}" if self.residual else ""
        return name + (f" (jitter {self.jitter})" if self.jitter is not None else "")

    def nbytes(self, head_dim: int, num_tokens: int) -> float:
        """K + V bytes per token and head, the largest full-precision tail spread over
        `num_tokens`."""
        coded = self.key.nbytes(head_dim) + self.value.nbytes(head_dim)
        tail = min(self.residual + self.token_group - 1, num_tokens)
        return coded + tail * (4 * head_dim - coded) / num_tokens


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x @ H along head_dim, as KVFormat("int4") rotates (head_dim a power of two)."""
    n = x.shape[-1]
    assert n & (n - 1) == 0, f"head_dim {n} is not a power of two"
    return x @ _hadamard(n, x.device)


def fake_quant(x: torch.Tensor, dim: int, symmetric: bool) -> torch.Tensor:
    """4-bit round trip of `x`, one float16 scale (and min) per slice along `dim`."""
    if symmetric:
        scale = (x.abs().amax(dim, keepdim=True) / 7).half().clamp_min(MIN_SCALE).float()
        return (x / scale).round().clamp(-8, 7) * scale
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((high - low) / 15).half().clamp_min(MIN_SCALE).float()
    low = low.half().float()
    return ((x - low) / scale).round().clamp(0, 15) * scale + low


def byte_scale_quant(x: torch.Tensor) -> torch.Tensor:
    """x [n, G, H, hd]: per channel over the G tokens, x = s * q + s * z with q in [0, 15],
    z an int8 zero point and s an e4m3 byte times a float16 scale per (group, head) chosen so
    the largest s is 448. s is rounded up, so the 15 steps still cover [min, max]."""
    low, high = x.amin(1, keepdim=True), x.amax(1, keepdim=True)  # [n, 1, H, hd]
    # 14 steps cover max - min from floor(min / s) * s; |min| / s <= 127 keeps z in int8
    step = torch.maximum((high - low) / 14, low.abs() / 127).clamp_min(MIN_SCALE)
    # (1 + 2^-10) outgrows float16's rounding: no target above e4m3's largest, 448
    outer = step.amax(-1, keepdim=True) / 448 * (1 + 2**-10)
    outer = outer.half().clamp_min(MIN_SCALE).float()
    target = step / outer
    byte = target.to(torch.float8_e4m3fn).view(torch.uint8)
    short = byte.view(torch.float8_e4m3fn).float() < target
    byte = torch.where(short, byte + 1, byte)  # the next e4m3 value up (all positive)
    scale = byte.view(torch.float8_e4m3fn).float() * outer
    zero = (low / scale).floor().clamp(-128, 127)
    return ((x / scale - zero).round().clamp(0, 15) + zero) * scale


class FakeQuant:
    """A store's write hook: codes each layer's tokens in place once they leave the
    full-precision tail. Assumes one sequence written in order (what scoring does)."""

    def __init__(self, scheme: Scheme, ropes: dict[int, RotaryEmbedding]) -> None:
        """`ropes`: each layer's rope, to undo on keys a pre-rope codec codes."""
        self.scheme = scheme
        self.ropes = ropes
        self.rows: dict[int, list[torch.Tensor]] = {}  # layer -> base rows by position
        self.coded: dict[int, int] = {}  # layer -> tokens coded so far
        self.generator = None
        if scheme.jitter is not None:
            self.generator = torch.Generator().manual_seed(scheme.jitter)

    def after_write(self, store: KVStore, layer_idx: int, rows: torch.Tensor) -> None:
        assert not store.format.is_quantized, "fake quantization needs a float store"
        self.rows.setdefault(layer_idx, []).append(rows)
        done = self.coded.get(layer_idx, 0)
        written = sum(len(r) for r in self.rows[layer_idx])
        group = self.scheme.token_group
        upto = max(0, (written - self.scheme.residual) // group * group)
        if upto <= done:
            return
        index = torch.cat(self.rows[layer_idx])[done:upto]
        for offset, codec in zip(
            store.layer_offsets(layer_idx), (self.scheme.key, self.scheme.value), strict=True
        ):
            x = store.data.index_select(0, index + offset)  # [n, H, hd] float32
            if self.generator is not None:
                x = x * (1 + 1e-6 * torch.randn(x.shape, generator=self.generator))
            if getattr(codec, "pre_rope", False):  # stored keys are roped by text position
                cos, sin = self.ropes[layer_idx].cos_sin(torch.arange(done, upto))
                coded = apply_rope(codec.code(apply_rope(x, cos, -sin)), cos, sin)
            else:
                coded = codec.code(x)
            store.data.index_copy_(0, index + offset, coded)
        self.coded[layer_idx] = upto

    def check_complete(self, num_tokens: int) -> None:
        """Every layer saw all tokens written, and coded all but the tail."""
        for layer, rows in self.rows.items():
            written = sum(len(r) for r in rows)
            assert written == num_tokens, f"layer {layer}: {written} of {num_tokens} written"
            tail = written - self.coded.get(layer, 0)
            assert tail <= self.scheme.residual + self.scheme.token_group - 1, (layer, tail)


TODAY = PerToken(today=True)


def schemes() -> list[Scheme]:
    """Candidates (a)-(c) and the noise of (a); main() also runs the engine's own float16 and
    int4."""
    out = [
        Scheme(TODAY, TODAY),  # (a) fake, must match the engine's int4
        # the noise floor: float-rounding-sized changes flip int4 codes and the ppl with them
        *(Scheme(TODAY, TODAY, jitter=seed) for seed in range(3)),
        Scheme(TODAY, Full()),  # which half costs what
        Scheme(Full(), TODAY),
        Scheme(PerToken(32, False, False), PerToken(32, False, False)),  # (b)
        Scheme(PerToken(32, False, True), PerToken(32, False, True)),
    ]
    for tokens in (16, 32, 64, 128):  # (c) KIVI keys, today's values
        for symmetric in (True, False):
            for hadamard in (False, True):
                out.append(Scheme(PerChannel(tokens, symmetric, hadamard), TODAY))
    return out


def residual_schemes(base: list[Scheme]) -> list[Scheme]:
    """(d): each given scheme with a full-precision residual of R tokens."""
    return [Scheme(s.key, s.value, r) for s in base for r in (16, 32, 64, 128) if s.residual == 0]


def check_codec_matches_today(head_dim: int) -> None:
    """The study's symmetric rotated per-32 codec is today's int4, bit for bit."""
    x = torch.randn(64, 2, head_dim) * torch.logspace(-2, 1, head_dim)
    ours, today = PerToken(32, True, True).code(x), TODAY.code(x)
    assert torch.allclose(ours, today, rtol=1e-6, atol=1e-6), (ours - today).abs().max()


def perplexity(llm: LLM, token_ids: list[int], hook: FakeQuant | None) -> float:
    stores = llm.engine.kv_stores
    for store in stores:
        store.write_hook = hook
    try:
        nll = -float(token_logprobs(llm.engine, token_ids).double().mean())
    finally:
        for store in stores:
            store.write_hook = None
    if hook is not None:
        hook.check_complete(len(token_ids))
    return math.exp(nll)


def layer_ropes(llm: LLM) -> dict[int, RotaryEmbedding]:
    model = llm.engine.model
    return {i: model.ropes[layer.rope_key] for i, layer in enumerate(model.layers)}


def load(model: str, kv: str, threads: int) -> LLM:
    return LLM(
        model,
        kv_cache_dtype=kv,
        num_threads=threads,
        max_num_batched_tokens=DEFAULT_CHUNK_SIZE,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=list(MODELS))
    parser.add_argument("--tokens", type=int, default=4096, help="tokens scored (4096)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--set",
        choices=("main", "extra", "none"),
        default="main",
        help="main: (a)-(c); extra: (e); none: only --residual-of (default main)",
    )
    parser.add_argument(
        "--only", nargs="*", default=None, help="keep the schemes whose name has one of these"
    )
    parser.add_argument(
        "--residual-of",
        nargs="*",
        default=[],
        help="(d): also run these schemes (by exact name) with residuals 16, 32, 64, 128",
    )
    parser.add_argument("--skip-engine", action="store_true", help="skip the f16/int4 engine runs")
    parser.add_argument("--out", default=None, help="append one JSON line per scheme here")
    parser.add_argument("--table", default=None, help="print a JSON-lines file as a table, only")
    args = parser.parse_args()
    if args.table is not None:
        print(markdown_table(args.table))
        return 0
    if args.model is None:
        parser.error("--model is required (unless --table)")

    torch.set_num_threads(args.threads)
    model = MODELS[args.model]
    text = read_text(None, args.tokens)

    def report(name: str, nbytes: float, ppl: float, seconds: float) -> None:
        row = {
            "model": args.model,
            "scheme": name,
            "bytes_per_token_head": round(nbytes, 2),
            "ppl": ppl,
            "seconds": round(seconds, 1),
        }
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    llm = load(model, "float32", args.threads)
    head_dim = llm.engine.kv_specs[0].head_dim
    token_ids = llm.tokenizer.encode(text)[: args.tokens]
    check_codec_matches_today(head_dim)
    if not args.skip_engine:
        for kv in ("float16", "int4"):
            engine = load(model, kv, args.threads)
            start = time.perf_counter()
            ppl = perplexity(engine, token_ids, None)
            nbytes = 2 * engine.engine.kv_specs[0].format.nbytes
            report(f"engine {kv}", nbytes, ppl, time.perf_counter() - start)
            del engine
    chosen = {"main": schemes(), "extra": extra_schemes(), "none": []}[args.set]
    by_name = {s.name: s for s in schemes() + extra_schemes()}
    unknown = [name for name in args.residual_of if name not in by_name]
    if unknown:
        parser.error(f"unknown schemes {unknown}; names: {sorted(by_name)}")
    chosen += residual_schemes([by_name[name] for name in args.residual_of])
    if args.only is not None:
        chosen = [s for s in chosen if any(part in s.name for part in args.only)]
    for scheme in chosen:
        start = time.perf_counter()
        ppl = perplexity(llm, token_ids, FakeQuant(scheme, layer_ropes(llm)))
        nbytes = scheme.nbytes(head_dim, len(token_ids))
        report(scheme.name, nbytes, ppl, time.perf_counter() - start)
    print(f"head_dim {head_dim}, float16 {4 * head_dim} bytes/token/head", file=sys.stderr)
    return 0


def markdown_table(path: str) -> str:
    """Rows of `--out` files, one line per scheme and a column pair per model: bytes and ×
    less, ppl and Δ% against the same model's engine float16 row."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    models = list(dict.fromkeys(r["model"] for r in rows))
    base = {r["model"]: r for r in rows if r["scheme"] == "engine float16"}
    by_scheme: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_scheme.setdefault(r["scheme"], {})[r["model"]] = r
    head = "| scheme |" + "".join(
        f" {m} bytes/token/head (× less) | {m} ppl (Δ% vs f16 KV) |" for m in models
    )
    lines = [head, "|---|" + "---:|---:|" * len(models)]
    for scheme, cells in by_scheme.items():
        line = f"| {scheme} |"
        for m in models:
            r = cells.get(m)
            if r is None:
                line += " – | – |"
                continue
            f16 = base[m]
            ratio = f16["bytes_per_token_head"] / r["bytes_per_token_head"]
            delta = 100 * (r["ppl"] / f16["ppl"] - 1)
            line += (
                f" {r['bytes_per_token_head']:.1f} ({ratio:.2f}×) | {r['ppl']:.3f} ({delta:+.1f}) |"
            )
        lines.append(line)
    return "\n".join(lines)


def extra_schemes() -> list[Scheme]:
    """(e): what the first numbers pointed to. Keys cost far more than values and want an
    offset (asymmetric), which costs scale bytes: so asymmetric keys over wider groups (64
    along head_dim, or 64 / 128 tokens per channel), beside values with one scale per 64."""
    v64 = PerToken(64, True, True)
    return [
        Scheme(PerToken(32, False, True), TODAY),
        Scheme(PerToken(64, False, True), TODAY),
        Scheme(PerToken(64, False, False), TODAY),
        Scheme(Full(), v64),
        Scheme(Full(), PerToken(128, True, True)),
        Scheme(PerToken(64, False, True), v64),
        Scheme(PerChannel(32, False, False), v64),
        Scheme(PerChannel(64, False, False), v64),
        Scheme(PerChannel(128, False, False), v64),
        # keys before rope: a channel's offset then stays put along the tokens
        Scheme(PerChannel(32, False, False, True), v64),
        Scheme(PerChannel(64, False, False, True), v64),
        Scheme(PerChannel(128, False, False, True), v64),
        Scheme(PerChannel(64, True, False, True), v64),
        # byte scales and zero points: the 32-token groups at the 64-token groups' bytes
        Scheme(PerChannel(32, False, False, True, True), v64),
        Scheme(PerChannel(64, False, False, True, True), v64),
    ]


if __name__ == "__main__":
    raise SystemExit(main())
