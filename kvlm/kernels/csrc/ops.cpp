// Torch operator registrations (namespace kvlm) and run-time ISA dispatch.
//
//   kvlm::cpu_isa() -> int                 best kernel this CPU runs: 1 ref, 2 avx2, 3 avx512
//   kvlm::amx_status() -> str              why avx512 matmuls skip AMX tiles ("": they use them)
//   kvlm::quantize_act(x) -> (qa, da, asum)
//   kvlm::qgemm(qa, da, asum, w, bits, group, scale_bytes, n, isa) -> out [M, n] fp32
//   kvlm::argmax_rows(logits [M, V]) -> [M] int64   (AVX2; torch.argmax(dim=-1)'s answer)
//   kvlm::dequant_rows(w, ids, bits, group, scale_bytes, k, n) -> rows [*ids.shape, k] fp32
//                                                   (w has n rows; an id outside [0, n) is an error)
//   kvlm::qlinear(x, w, bits, group, scale_bytes, n, isa) -> out [M, n] fp32
//
// isa 0 means "the best this CPU runs"; asking for one the CPU lacks is an error, never a crash.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <cpuid.h>
#include <torch/library.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <vector>

#include "decode_math.h"
#include "qgemm.h"

namespace kvlm {
namespace {

bool has_f16c() {
  unsigned eax, ebx, ecx, edx;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
}

int64_t detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma") && has_f16c())
    return kIsaAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c())
    return kIsaAvx2;
  return kIsaRef;
}

}  // namespace

int64_t cpu_isa() {
  static const int64_t isa = detect_isa();
  return isa;
}

namespace {

// Empty when AMX int8 runs here: the CPU has AMX-TILE and AMX-INT8 (CPUID 7.0 EDX bits 24, 25)
// besides the avx512 kernels (AMX results are scaled with AVX-512), and Linux grants this
// process the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA; 5.16+).
std::string detect_amx() {
  if (cpu_isa() != kIsaAvx512) return "the CPU lacks AVX-512 VNNI";
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 24)) ||
      !(edx & (1u << 25)))
    return "the CPU lacks AMX int8";
#ifdef __linux__
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
  if (syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) != 0)
    return std::string("Linux refused the AMX tile state: ") + std::strerror(errno);
  return "";
#else
  return "AMX tile state is requested on Linux only";
#endif
}

}  // namespace

const std::string& amx_status() {
  static const std::string status = detect_amx();
  return status;
}

QGemmKernel qgemm_kernel(int64_t isa) {
  if (isa == kIsaAvx512) return amx_status().empty() ? qgemm_amx : qgemm_avx512;
  return isa == kIsaAvx2 ? qgemm_avx2 : qgemm_ref;
}

namespace {

// A packed weight [n_tiles, n_groups, block_bytes] of n rows in this format; returns whether its
// blocks are symmetric (no stored minimums).
bool check_packed(const char* op, const at::Tensor& w, int64_t bits, int64_t group,
                  int64_t scale_bytes, int64_t n) {
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kByte && w.is_contiguous() && w.is_cpu(), op,
              ": w must be contiguous uint8 [n_tiles, n_groups, block_bytes]");
  const int symmetric = symmetric_blocks(bits, group, scale_bytes, w.size(2));
  TORCH_CHECK(symmetric >= 0, op, ": block of ", w.size(2), " bytes, format needs ",
              block_size(bits, group, scale_bytes, false),
              bits == 8 ? " (or without minimums " + std::to_string(block_size(bits, group, scale_bytes, true)) + ")" : std::string());
  TORCH_CHECK(n > (w.size(0) - 1) * kTileRows && n <= w.size(0) * kTileRows, op, ": n=", n,
              " does not match ", w.size(0), " tiles of 16 rows");
  return symmetric == 1;
}

// With the quantizer of `isa` (0: the best here); every one gives the same bytes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act_isa(const at::Tensor& x, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.is_cpu() && x.scalar_type() == at::kFloat,
              "kvlm::quantize_act expects a 2-D float32 CPU tensor, got ", x.sizes(), " ",
              x.scalar_type());
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), Kp = padded_k(K);
  at::Tensor qa = at::empty({M, Kp}, x.options().dtype(at::kChar));
  at::Tensor da = at::empty({M, Kp / kActBlock}, x.options());
  at::Tensor asum = at::empty({M, Kp / 16}, x.options().dtype(at::kInt));
  const float* xp = xc.data_ptr<float>();
  int8_t* qp = qa.data_ptr<int8_t>();
  float* dp = da.data_ptr<float>();
  int32_t* sp = asum.data_ptr<int32_t>();
  const int64_t ldx = xc.stride(0);
  const QuantizeRows quantize = quantize_rows_for(isa == 0 ? cpu_isa() : isa);
  at::parallel_for(0, M, quantize_grain(Kp),
                   [&](int64_t m0, int64_t m1) { quantize(xp, ldx, K, Kp, qp, dp, sp, m0, m1); });
  return {qa, da, asum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act(const at::Tensor& x) {
  return quantize_act_isa(x, 0);
}

at::Tensor qgemm(const at::Tensor& qa, const at::Tensor& da, const at::Tensor& asum,
                 const at::Tensor& w, int64_t bits, int64_t group, int64_t scale_bytes, int64_t n,
                 int64_t isa) {
  TORCH_CHECK((bits == 4 && group == 32) || ((bits == 6 || bits == 8) && (group == 32 || group == 16)),
              "kvlm::qgemm: unsupported format bits=", bits, " group=", group);
  TORCH_CHECK(scale_bytes == 2 || scale_bytes == 4, "kvlm::qgemm: scale_bytes must be 2 or 4");
  TORCH_CHECK(qa.dim() == 2 && qa.scalar_type() == at::kChar && qa.is_contiguous(),
              "kvlm::qgemm: qa must be contiguous int8 [M, Kp]");
  const int64_t M = qa.size(0), Kp = qa.size(1);
  TORCH_CHECK(Kp % kActBlock == 0, "kvlm::qgemm: Kp must be a multiple of 32");
  TORCH_CHECK(da.is_contiguous() && da.scalar_type() == at::kFloat && da.numel() == M * (Kp / 32),
              "kvlm::qgemm: da must be contiguous float32 [M, Kp / 32]");
  TORCH_CHECK(asum.is_contiguous() && asum.scalar_type() == at::kInt &&
                  asum.numel() == M * (Kp / 16),
              "kvlm::qgemm: asum must be contiguous int32 [M, Kp / 16]");
  const bool symmetric = check_packed("kvlm::qgemm", w, bits, group, scale_bytes, n);
  TORCH_CHECK(w.size(1) * group == Kp, "kvlm::qgemm: weight has ", w.size(1) * group,
              " input columns, activations ", Kp);
  const int64_t best = cpu_isa();
  if (isa == 0) isa = best;
  TORCH_CHECK(isa >= kIsaRef && isa <= best, "kvlm::qgemm: isa ", isa,
              " is not available on this CPU (best: ", best, ")");
  const QGemmKernel kernel = qgemm_kernel(isa);

  at::Tensor out = at::empty({M, n}, qa.options().dtype(at::kFloat));
  QGemmArgs a = weight_args(w.data_ptr<uint8_t>(), w.size(1), w.size(2), bits, group,
                            scale_bytes, symmetric);
  a.qa = qa.data_ptr<int8_t>();
  a.lda = Kp;
  a.da = da.data_ptr<float>();
  a.ldd = Kp / kActBlock;
  a.asum = asum.data_ptr<int32_t>();
  a.lds = Kp / 16;
  a.out = out.data_ptr<float>();
  a.ldo = n;
  a.M = M;
  a.N = n;
  at::parallel_for(0, w.size(0), tile_grain(M, Kp), [&](int64_t t0, int64_t t1) { kernel(a, t0, t1); });
  return out;
}

at::Tensor dequant_rows(const at::Tensor& w, const at::Tensor& ids, int64_t bits, int64_t group,
                        int64_t scale_bytes, int64_t k, int64_t n) {
  const bool symmetric = check_packed("kvlm::dequant_rows", w, bits, group, scale_bytes, n);
  TORCH_CHECK(w.size(1) * group >= k, "kvlm::dequant_rows: weight has ", w.size(1) * group,
              " input columns, fewer than k=", k);
  const at::Tensor flat = ids.reshape(-1).to(at::kLong).contiguous();
  const int64_t count = flat.numel();
  const int64_t* id = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < n, "kvlm::dequant_rows: row ", id[i], " out of range [0, ",
                n, ")");
  at::Tensor out = at::empty({count, k}, w.options().dtype(at::kFloat));
  const QGemmArgs a = weight_args(w.data_ptr<uint8_t>(), w.size(1), w.size(2), bits, group,
                                  scale_bytes, symmetric);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, count, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) dequantize_row(a, id[i], k, o + i * k);
  });
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(k);
  return out.view(shape);
}

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_cpu() && logits.scalar_type() == at::kFloat &&
                  logits.size(1) > 0,
              "kvlm::argmax_rows expects a non-empty 2-D float32 CPU tensor, got ",
              logits.sizes(), " ", logits.scalar_type());
  TORCH_CHECK(cpu_isa() >= kIsaAvx2, "kvlm::argmax_rows needs AVX2");
  const at::Tensor x = logits.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) op[r] = decode::argmax(xp + r * n, n);
  });
  return out;
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& w, int64_t bits, int64_t group,
                   int64_t scale_bytes, int64_t n, int64_t isa) {
  TORCH_CHECK(isa >= 0 && isa <= cpu_isa(), "kvlm::qlinear: isa ", isa,
              " is not available on this CPU (best: ", cpu_isa(), ")");
  auto [qa, da, asum] = quantize_act_isa(x, isa);  // the ref path quantizes in scalar code too
  return qgemm(qa, da, asum, w, bits, group, scale_bytes, n, isa);
}

}  // namespace

TORCH_LIBRARY(kvlm, m) {
  m.def("cpu_isa() -> int", &cpu_isa);
  m.def("amx_status() -> str", [] { return amx_status(); });
  m.def("quantize_act(Tensor x) -> (Tensor, Tensor, Tensor)");
  m.def(
      "qgemm(Tensor qa, Tensor da, Tensor asum, Tensor w, int bits, int group, int scale_bytes, "
      "int n, int isa) -> Tensor");
  m.def("argmax_rows(Tensor logits) -> Tensor");
  m.def(
      "dequant_rows(Tensor w, Tensor ids, int bits, int group, int scale_bytes, int k, int n) -> "
      "Tensor");
  m.def(
      "qlinear(Tensor x, Tensor w, int bits, int group, int scale_bytes, int n, int isa) -> "
      "Tensor");
}

TORCH_LIBRARY_IMPL(kvlm, CPU, m) {
  m.impl("quantize_act", &quantize_act);
  m.impl("qgemm", &qgemm);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("dequant_rows", &dequant_rows);
  m.impl("qlinear", &qlinear);
}

}  // namespace kvlm
