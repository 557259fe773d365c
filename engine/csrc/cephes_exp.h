// exp(x) for x already clamped to [-87, 88], Cephes' expf polynomial (~2 ulp), written branch-free so
// the loops that call it vectorise (libm's expf does not vectorise without -ffast-math, which would
// also let the compiler assume no NaN/Inf). The callers clamp, and decide what NaN and the clamped
// tails return (paged_attention.cpp, pointwise.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace loraserve {

inline float cephes_exp(float clamped) {
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace loraserve
