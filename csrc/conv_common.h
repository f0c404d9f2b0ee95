// Activations shared by the convolution kernels (conv.cpp, caser.cpp): the names the ops take,
// act(z) and d act / d z, computed as torch's modules and backward formulas compute them (gelu
// is the exact erf form).
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <string>
#include <type_traits>

namespace fastrec {

enum class Act { kNone, kRelu, kGelu, kTanh, kSigmoid };

// The activation called `name`; `op` and `what` name the op and the argument in the error.
inline Act parse_act(const std::string& name, const char* op, const char* what) {
  if (name == "none") return Act::kNone;
  if (name == "relu") return Act::kRelu;
  if (name == "gelu") return Act::kGelu;
  if (name == "tanh") return Act::kTanh;
  if (name == "sigmoid") return Act::kSigmoid;
  TORCH_CHECK(false, "fastrec ", op, " (cpp): ", what,
              " must be one of none, relu, gelu, tanh, sigmoid, got '", name, "'");
}

template <Act A>
using ActConstant = std::integral_constant<Act, A>;

// f(ActConstant<act>{}) for the runtime activation act: code specialised per activation reads it
// as the template argument decltype(a)::value.
template <typename F>
inline void dispatch_act(Act act, F&& f) {
  switch (act) {
    case Act::kNone: return f(ActConstant<Act::kNone>{});
    case Act::kRelu: return f(ActConstant<Act::kRelu>{});
    case Act::kGelu: return f(ActConstant<Act::kGelu>{});
    case Act::kTanh: return f(ActConstant<Act::kTanh>{});
    case Act::kSigmoid: return f(ActConstant<Act::kSigmoid>{});
  }
}

template <typename T>
inline T act_forward(Act act, T z) {
  switch (act) {
    case Act::kRelu:
      return (z > T(0) || z != z) ? z : T(0);  // NaN propagates, as torch.relu
    case Act::kGelu:
      return T(0.5) * z * (T(1) + std::erf(z * T(0.70710678118654752440)));
    case Act::kTanh:
      return std::tanh(z);
    case Act::kSigmoid:
      return T(1) / (T(1) + std::exp(-z));
    case Act::kNone:
      break;
  }
  return z;
}

// d act / d z as torch's backward formulas compute it (relu: threshold_backward, which zeroes
// the gradient where relu(z) <= 0, so a NaN z passes it).
template <typename T>
inline T act_derivative(Act act, T z) {
  switch (act) {
    case Act::kRelu:
      return z <= T(0) ? T(0) : T(1);
    case Act::kGelu: {
      const T cdf = T(0.5) * (T(1) + std::erf(z * T(0.70710678118654752440)));
      const T pdf = std::exp(T(-0.5) * z * z) * T(0.39894228040143267794);  // 1 / sqrt(2 pi)
      return cdf + z * pdf;
    }
    case Act::kTanh: {
      const T t = std::tanh(z);
      return T(1) - t * t;
    }
    case Act::kSigmoid: {
      const T s = T(1) / (T(1) + std::exp(-z));
      return s * (T(1) - s);
    }
    case Act::kNone:
      break;
  }
  return T(1);
}

}  // namespace fastrec
