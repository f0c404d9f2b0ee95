// The C++ entry points of the attention op (csrc/attention.cpp), for the other translation units
// that compute attention as part of a larger op (encoder.cpp). Arguments and results are those of
// the registered ops torch.ops.fastrec.attention_forward_cpp / attention_backward_cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace fastrec {

// (out (B, H, Lq, D), lse (B, H, Lq), probs (B, H, Lq, Lk) or empty unless return_probs).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward_cpp(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& seed, bool causal,
    double scale, double dropout_p, const std::optional<at::Tensor>& dropout_mask,
    bool return_probs);

// (dq, dk, dv), contiguous, in the dtypes of q, k, v.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpp(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& seed, bool causal, double scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_mask);

}  // namespace fastrec
